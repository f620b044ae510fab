"""The benchmark: isolated encode (the ceiling), the full Ray pipeline, and a naive loop, on the same
generated videos, in one process tree. Never run as a test.

  python -m bench --device cpu|cuda [--quick] [--sweep] [--memory] [--decode] [--scenes]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

from pipeline import decode, samples
from pipeline.config import Config, validate

# CPU: a small random-weight CogVideoX VAE (same class and layout, fewer channels).
SMALL_COGVIDEOX = dict(block_out_channels=(32, 32, 64, 64), latent_channels=16, layers_per_block=1,
                       norm_num_groups=8)
# (frames, height, width) encoded per clip, and the source videos' size (resized by the pipeline).
SHAPES = {"cpu": ((17, 128, 192), (192, 288)), "cuda": ((49, 480, 720), (720, 1080))}


@dataclass
class Workload:
    root: str
    model: str
    videos: str
    clip_shape: tuple[int, int, int]
    num_clips: int


class RssSampler:
    """Peak resident memory while the block runs, sampled: summed over this process and all its
    descendants (the local Ray's too), or this process alone with ``children=False`` (the driver)."""

    def __init__(self, interval: float = 0.1, children: bool = True):
        import psutil

        self.proc, self.interval, self.children = psutil.Process(), interval, children
        self.start = self.peak = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *(self.proc.children(recursive=True) if self.children else [])]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self._rss()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    @property
    def growth_mb(self) -> float:
        """Peak over what was resident when the block began."""
        return round((self.peak - self.start) / 2**20, 1)


@contextlib.contextmanager
def moto_s3():
    """A real S3 API server (moto) on a free loopback port for the block: yields its endpoint."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def make_workload(device: str, num_videos: int, clips_per_video: int, root: str | None = None,
                  tiny: bool = False) -> Workload:
    (f, h, w), (src_h, src_w) = SHAPES[device]
    if tiny:  # for memory scaling: pixels and bookkeeping, not model cost
        (f, h, w), (src_h, src_w) = (9, 64, 64), (96, 96)
    root = root or tempfile.mkdtemp(prefix="vl-bench-")
    model = os.path.join(root, "model")
    if not os.path.exists(model):
        if tiny:
            samples.make_tiny_vae(model)
        elif device == "cuda":
            samples.make_tiny_vae(model, **{k: v for k, v in _full_size().items()})
        else:
            samples.make_tiny_vae(model, **SMALL_COGVIDEOX)
    videos = os.path.join(root, f"videos-{num_videos}x{clips_per_video}")
    if not os.path.exists(videos):
        for i in range(num_videos):
            samples.write_video(os.path.join(videos, f"v{i:04d}.mp4"),
                                samples.synthetic_frames(f * clips_per_video, src_h, src_w, seed=i))
    return Workload(root, model, videos, (f, h, w), num_videos * clips_per_video)


def _full_size() -> dict:
    """The real CogVideoX VAE architecture: diffusers' defaults for the class."""
    from diffusers import AutoencoderKLCogVideoX
    import inspect

    params = inspect.signature(AutoencoderKLCogVideoX.__init__).parameters
    return {k: params[k].default for k in ("block_out_channels", "latent_channels", "layers_per_block",
                                           "norm_num_groups", "down_block_types", "up_block_types")}


def _config(w: Workload, device: str, output: str, **kw) -> Config:
    f, h, wd = w.clip_shape
    base = dict(input=w.videos, output=output, model=w.model, num_frames=f, height=h, width=wd,
                device=device, overwrite=True)
    return Config(**{**base, **kw})


def isolated_encode(w: Workload, device: str, batch_size: int, dtype: str | None,
                    memory_format: str = "auto", keep_first: bool = False, flops: bool = True) -> dict:
    """(a) The actor's encode step on clips already decoded into memory: the ceiling. With
    ``keep_first``, the first batch's latents come back too (``first_latents``, an array), to
    compare a lever's values with the default's; ``flops`` (CUDA): count one clip's FLOPs."""
    from actors.encoder import VAEEncoder

    cfg, info = validate(_config(w, device, os.path.join(w.root, "iso-out"), batch_size=batch_size,
                                 memory_format=memory_format))
    cfg = cfg.replace(dtype=dtype or ("bfloat16" if device == "cuda" else "float32"), num_actors=(1, 1))
    import av

    clips = []
    for name in sorted(os.listdir(w.videos)):
        with av.open(os.path.join(w.videos, name)) as c:
            clips += [row["frames"] for _, row in decode.iter_clips(c, name, cfg)]
    enc = VAEEncoder(cfg, info)
    frames = np.stack(clips)
    ids = [str(i) for i in range(len(clips))]
    first = enc.encode(frames[:batch_size], ids[:batch_size])  # warm-up (cudnn autotune, allocator)
    _sync(device)
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(0, len(clips), batch_size):
        enc.encode(frames[i:i + batch_size], ids[i:i + batch_size])
    _sync(device)
    wall = time.perf_counter() - start
    result = {"isolated_clips_per_s": len(clips) / wall}
    if device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if keep_first:
        result["first_latents"] = first["latents"]
    if device == "cuda" and flops:
        result.update(_flops(enc, frames[:1], wall / len(clips)))
    return result


def _sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _flops(enc, one_clip, seconds_per_clip) -> dict:
    """FLOPs of one clip's encode counted by torch's flop counter, not assumed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.gpu import peak_bf16_tflops  # the per-card table, cited there

    with FlopCounterMode(display=False) as counter:
        enc.encode(one_clip, ["0"])
    tflops = counter.get_total_flops() / 1e12
    name = torch.cuda.get_device_name()
    peak = peak_bf16_tflops(name)
    achieved = tflops / seconds_per_clip
    return {"tflops_per_clip": round(tflops, 2), "achieved_tflops": round(achieved, 1),
            "mfu": round(achieved / peak, 3) if peak else None, "gpu": name}


def pipeline_run(w: Workload, device: str, batch_size: int, num_actors: int = 1,
                 gpus_per_actor: float = 1.0) -> dict:
    """(b) The full pipeline through Ray: listing, decode tasks, actor pool, Parquet writes."""
    from pipeline.run import run

    cfg, info = validate(_config(w, device, os.path.join(w.root, "pipe-out"), batch_size=batch_size,
                                 num_actors=(num_actors, num_actors), gpus_per_actor=gpus_per_actor))
    start = time.perf_counter()
    summary = run(cfg, info)
    wall = time.perf_counter() - start
    assert summary["clips"] == w.num_clips, summary
    return {"pipeline_clips_per_s": summary["clips"] / wall, "pipeline_wall_s": wall}


def naive_loop(w: Workload, device: str, dtype: str | None) -> dict:
    """(c) The naive script, run as a user runs it: a fresh Python process (imports and model load
    included, as the pipeline's actor pays them too), timed from outside."""
    args = json.dumps({"model": w.model, "videos": w.videos, "clip_shape": w.clip_shape,
                       "device": device, "dtype": dtype})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.harness", "naive", args],
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    clips = json.loads(proc.stdout.strip().splitlines()[-1])["clips"]
    return {"naive_clips_per_s": clips / wall, "naive_wall_s": round(wall, 3)}


def _naive_script(model: str, videos: str, clip_shape, device: str, dtype: str | None) -> int:
    """Like the CogVideo DDIM-inversion script: one video at a time, decode it whole, resize and
    normalise to float on the CPU, encode one clip at a time on the device."""
    import av
    import torch
    from diffusers import AutoencoderKLCogVideoX

    f, h, wd = clip_shape
    torch_dtype = getattr(torch, dtype or ("bfloat16" if device == "cuda" else "float32"))
    vae = AutoencoderKLCogVideoX.from_pretrained(model, subfolder="vae", torch_dtype=torch_dtype)
    vae = vae.to(device).eval()
    clips = 0
    for name in sorted(os.listdir(videos)):
        with av.open(os.path.join(videos, name)) as c:
            video = np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)])
        x = torch.from_numpy(video).permute(0, 3, 1, 2).float()  # [N,3,H,W] on the CPU
        x = torch.nn.functional.interpolate(x, size=(h, wd), mode="bilinear", align_corners=False)
        x = (x / 127.5 - 1).permute(1, 0, 2, 3)  # [3,N,H,W]
        for s in range(0, x.shape[1] - f + 1, f):
            with torch.no_grad():
                z = vae.encode(x[None, :, s:s + f].to(device, torch_dtype)).latent_dist.mode()
                (z * vae.config.scaling_factor).cpu()
            clips += 1
    _sync(device)
    return clips


def decode_vs_ffmpeg(device: str, frames: int = 240) -> dict:
    """PyAV decode + resize on one thread (our decode step) against `ffmpeg -threads 1` decoding
    the same file to rawvideo at the same size."""
    import av

    (_, h, w), (src_h, src_w) = SHAPES[device]
    root = tempfile.mkdtemp(prefix="vl-dec-")
    path = samples.write_video(os.path.join(root, "long.mp4"), samples.synthetic_frames(frames, src_h, src_w))
    cfg = Config(input=path, output=root, model="m", num_frames=1, height=h, width=w)
    best_pyav = best_ff = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        with av.open(path) as c:
            stream = c.streams.video[0]
            stream.thread_type, stream.codec_context.thread_count = "SLICE", 1
            resizer = decode.Resizer()  # as decode.iter_clips does, one per video
            n = sum(1 for fr in c.decode(stream) if resizer(fr, cfg) is not None)
        best_pyav = min(best_pyav, time.perf_counter() - start)
        start = time.perf_counter()
        subprocess.run(["ffmpeg", "-v", "error", "-threads", "1", "-i", path, "-vf",
                        f"scale={w}:{h}:flags=bicubic", "-f", "rawvideo", "-pix_fmt", "rgb24",
                        "-threads", "1", "-y", "/dev/null"], check=True)
        best_ff = min(best_ff, time.perf_counter() - start)
    shutil.rmtree(root)
    return {"decode_pyav_fps": round(n / best_pyav, 1), "decode_ffmpeg_fps": round(frames / best_ff, 1),
            "decode_vs_ffmpeg": round(best_ff / best_pyav, 3)}


def memory_scaling(device: str, base_videos: int) -> dict:
    """Peak RSS of the whole process tree when the dataset grows 10x, and when one video does."""
    out = {}
    for label, (videos, clips) in {"base": (base_videos, 2), "dataset_10x": (10 * base_videos, 2),
                                   "video_10x": (base_videos, 20)}.items():
        w = make_workload(device, videos, clips, tiny=True)
        with RssSampler() as rss:
            pipeline_run(w, device, batch_size=4)
        out[f"peak_rss_mb_{label}"] = rss.peak_mb
        shutil.rmtree(w.root)
    out["rss_dataset_10x_ratio"] = round(out["peak_rss_mb_dataset_10x"] / out["peak_rss_mb_base"], 3)
    out["rss_video_10x_ratio"] = round(out["peak_rss_mb_video_10x"] / out["peak_rss_mb_base"], 3)
    return out


def sweep(w: Workload, device: str, batch_sizes, actor_counts, gpus_per_actor) -> list[dict]:
    rows = []
    for actors in actor_counts:
        for bs in batch_sizes:
            r = pipeline_run(w, device, bs, num_actors=actors,
                             gpus_per_actor=gpus_per_actor / actors if device == "cuda" else 1.0)
            rows.append({"batch_size": bs, "actors": actors, "clips_per_s": round(r["pipeline_clips_per_s"], 3)})
            print(f"  sweep: batch {bs} actors {actors}: {rows[-1]['clips_per_s']} clips/s", flush=True)
    return rows


def plot(rows: list[dict], path: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for actors in sorted({r["actors"] for r in rows}):
        pts = [(r["batch_size"], r["clips_per_s"]) for r in rows if r["actors"] == actors]
        label = f"{actors} actor(s)" + (" per GPU" if device == "cuda" else "")
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("batch size (clips per actor call)")
    ax.set_ylabel("pipeline clips/s")
    ax.set_title(f"video-latents pipeline, {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer videos: a smoke run in a few minutes")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--sweep", action="store_true", help="clips/s against batch size and actors; plot")
    p.add_argument("--memory", action="store_true", help="peak RSS as the dataset and a video grow 10x")
    p.add_argument("--decode", action="store_true", help="PyAV decode+resize against ffmpeg -threads 1")
    p.add_argument("--scenes", action="store_true", help="decode with --split-scenes against without (bench/scenes.py)")
    p.add_argument("--plot", default="bench/results/sweep-{device}.png")
    args = p.parse_args(argv)
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    num_videos, clips_per_video = (3, 2) if args.quick else (6, 4)
    bs = args.batch_size or (2 if args.device == "cpu" else 1)
    w = make_workload(args.device, num_videos, clips_per_video)
    result = {"device": args.device, "model": "AutoencoderKLCogVideoX " +
              ("small random-weight" if args.device == "cpu" else "full-size random-weight"),
              "clip_shape": list(w.clip_shape), "clips": w.num_clips, "batch_size": bs,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    with RssSampler() as rss:
        result.update(isolated_encode(w, args.device, bs, args.dtype))
        result.update(pipeline_run(w, args.device, bs))
        result.update(naive_loop(w, args.device, args.dtype))
    result["peak_rss_mb"] = rss.peak_mb
    result["pipeline_vs_isolated"] = round(result["pipeline_clips_per_s"] / result["isolated_clips_per_s"], 3)
    result["pipeline_vs_naive"] = round(result["pipeline_clips_per_s"] / result["naive_clips_per_s"], 3)
    print("headline:", json.dumps(result), flush=True)
    if args.decode or not args.quick:
        if shutil.which("ffmpeg"):
            result.update(decode_vs_ffmpeg(args.device))
        else:
            print("(ffmpeg not found: decode comparison skipped; `apt-get install ffmpeg` for it)")
    if args.scenes:
        from bench import scenes

        result["scenes"] = scenes.main([])
    if args.memory:
        result.update(memory_scaling(args.device, base_videos=4))
    if args.sweep:
        # On CPU, actors beyond (cores - 1) are capped by the pipeline: sweep what can run.
        actor_counts = [1, 2] if args.device == "cuda" else list(range(1, max(1, (os.cpu_count() or 2) - 1) + 1))
        rows = sweep(w, args.device, [1, 2, 4, 8] if args.device == "cpu" else [1, 2, 4], actor_counts, 1.0)
        result["sweep"] = rows
        path = args.plot.format(device=args.device)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        plot(rows, path, args.device)
        result["plot"] = path
    for k in ("isolated_clips_per_s", "pipeline_clips_per_s", "naive_clips_per_s", "pipeline_wall_s"):
        result[k] = round(result[k], 3)
    _table(result)
    shutil.rmtree(w.root, ignore_errors=True)
    print(json.dumps(result))
    return result


def _table(r: dict) -> None:
    print("\n| measure | value |\n| --- | --- |")
    for k, v in r.items():
        if k != "sweep":
            print(f"| {k} | {v} |")
    print()


if __name__ == "__main__" and sys.argv[1:2] == ["naive"]:
    print(json.dumps({"clips": _naive_script(**json.loads(sys.argv[2]))}))
