"""The GPU benchmark in one process and one JSON file, built to spend a short GPU lease well.

  python -m bench.gpu --out OUTDIR [--quick] [--budget-s 480] [--device auto|cuda|cpu] [--only A,B]

Sections, in this order (most wanted first). Each is timed; one that fails records its error and
the next still runs; once the time budget is spent, the section running is interrupted and the
rest are marked skipped. OUTDIR/gpu-bench.json is rewritten after every section, so a run cut
short still leaves what it measured.

  environment         device, versions, TF32 flags, where diffusers, av and ray were imported from
  family_correctness  each VAE family the project supports (pipeline.model.FAMILIES), the same random
                      weights and clips: fp32 and bf16 on the device against fp32 on the CPU
                      (relative L2 error of the latents)
  encoder_path        the project's VAEEncoder on the device, end to end, against it on the CPU
  isolated            bench.harness.isolated_encode: the full-size CogVideoX VAE at 49x480x720, bf16:
                      clips/s, TFLOP per clip (counted by torch's FlopCounterMode), achieved TFLOP/s,
                      MFU against the card's dense bf16 peak (PEAK_BF16_TFLOPS below)
  pipeline            the whole Ray job (pipeline.run.run, as bench.harness.pipeline_run), decoding on
                      this machine's CPUs: clips/s over the whole run, and in steady state (from the
                      first encoded clip to the last, start-up excluded) against the isolated encode
  naive               bench.harness.naive_loop: the naive script, in a fresh process
  levers              issue 11's levers that are a switch, each flipped in the isolated encode and
                      measured back to back with the default, twice each (A B A B): the batch size
                      (1, 2, 4 on CUDA: clips/s, peak memory, and the batch the encoder's memory
                      search picks, the CLI's default there); the memory format on the CPU (clips/s
                      and the latents' rel-L2 against the default's, the default's own rerun as the
                      noise floor); on CUDA the first GPU run measured channels_last_3d at 0.65x
                      contiguous on an H200, so auto keeps contiguous there and it is not rerun
  sweep               pipeline clips/s against batch size and actors per GPU (two actors take 0.5 GPU
                      each); last, as it takes what is left of the budget

Without CUDA everything runs on the CPU with small shapes and tiny models, and the JSON says so
(device_name "cpu", cpu_fallback true, mfu null; the FLOPs are still counted): that is how it is
tested off the GPU machine.
On the GPU machine, run it through bench/gpu_run.sh, which installs the carried wheels first.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback

REPORT_NAME = "gpu-bench.json"
SECTIONS = ("environment", "family_correctness", "encoder_path", "isolated", "pipeline", "naive", "levers", "sweep")
DEFAULT_BUDGET_S = 480.0  # a GPU lease is 15 minutes, machine start and installing the bundle included

# Generated workload for isolated/pipeline/naive/sweep: (videos, clips per video).
WORKLOAD = {("cuda", False): (4, 3), ("cuda", True): (2, 2), ("cpu", False): (3, 2), ("cpu", True): (2, 2)}
# Sweep points: batch sizes, and actors sharing the GPU (CPU: one actor; the pipeline keeps a CPU
# for decoding, so a second CPU actor would be capped away on a small machine anyway).
# The levers section's batch sizes (the isolated encode, interleaved, twice each).
LEVER_BATCHES = {"cuda": (1, 2, 4), "cpu": (1, 2)}
SWEEP = {("cuda", False): ((1, 2, 4), (1, 2)), ("cuda", True): ((1, 2), (1, 2)),
         ("cpu", False): ((1, 2), (1,)), ("cpu", True): ((1, 2), (1,))}
# Clips per family in the correctness check, and the smallest spatial size encoded (rounded up to
# a multiple of the family's compression; frames are 2 x its temporal ratio + 1).
FAMILY_CLIPS, FAMILY_MIN_SIZE = 2, {"cuda": 96, "cpu": 32}
# The encoder-path check: clips, and their shape (frames, height, width) per device.
ENCODER_CLIPS, ENCODER_SHAPE = 2, {"cuda": (9, 128, 192), "cpu": (9, 64, 64)}


# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a fragment of torch.cuda.get_device_name(),
# most specific first ("NVIDIA H100 80GB HBM3" is the SXM card; "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
# "NVIDIA H200", "NVIDIA H200 NVL"). NVIDIA's datasheets quote bf16 with 2:4 sparsity; dense is half:
#   NVIDIA H100 Tensor Core GPU datasheet: SXM 1,979 -> 989; PCIe 1,513 -> 756; NVL 1,671 -> 835
#   NVIDIA H200 Tensor Core GPU datasheet: SXM 1,979 -> 989 (GH200 the same); NVL 1,671 -> 835
#   NVIDIA A100 datasheet: 312 dense (SXM and PCIe); NVIDIA L40S datasheet: 362 dense (733 sparse)
# An unknown card gets mfu null (its achieved TFLOP/s are still reported).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.0),
                    ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0))


class SectionTimeout(Exception):
    """The time budget ran out while a section was running."""


# ---- The project's entry points: every call into pipeline/, actors/ and bench.harness is in this
# block, so that a changed signature there (they are being extended) is one edit here. ---------------

def harness():
    import bench.harness

    return bench.harness


def make_workload(device: str, videos: int, clips_per_video: int, root: str):
    # On the CPU: the harness's tiny workload (9x64x64 clips, tiny VAE); on CUDA: the full-size
    # CogVideoX architecture at 49x480x720.
    return harness().make_workload(device, videos, clips_per_video, root=root, tiny=device == "cpu")


def isolated_encode(workload, device: str, batch_size: int, lever_format: str | None = None) -> dict:
    """The harness's isolated encode. For the levers section (``lever_format``: the memory format
    to run with), its first batch's latents come back too, as ``first_latents``, and no FLOPs are
    counted (the isolated section has them)."""
    if lever_format is None:
        return harness().isolated_encode(workload, device, batch_size, None)
    return harness().isolated_encode(workload, device, batch_size, None, memory_format=lever_format,
                                     keep_first=True, flops=False)


def auto_memory_format(device: str) -> str:
    """What --memory-format auto picks on this device (the encoder's rule)."""
    from pipeline.config import Config, memory_format

    return memory_format(Config(input="-", output="-", model="-"), device)


def count_flops_per_clip(workload, device: str) -> int:
    """FLOPs of one clip through the project's encoder (configured as bench.harness.isolated_encode
    configures it), counted by torch's FlopCounterMode: what bench.harness counts on CUDA."""
    from torch.utils.flop_counter import FlopCounterMode

    from actors.encoder import VAEEncoder
    from pipeline.config import validate

    cfg, info = validate(harness()._config(workload, device, os.path.join(workload.root, "flops-out"), batch_size=1))
    cfg = cfg.replace(dtype="bfloat16" if device == "cuda" else "float32", num_actors=(1, 1))
    encoder = VAEEncoder(cfg, info)
    with FlopCounterMode(display=False) as counter:
        encoder.encode(synthetic_clips(1, *workload.clip_shape), ["flops"])
    return counter.get_total_flops()


def pipeline_run(workload, device: str, batch_size: int, actors: int = 1) -> dict:
    """bench.harness.pipeline_run, keeping the run's steady state from its summary (clips/s from the
    first encoded clip to the last: Ray's start, the actors' model load and the first decode excluded)."""
    from pipeline.config import validate
    from pipeline.run import run as run_pipeline

    gpus_per_actor = 1.0 / actors if device == "cuda" else 1.0  # two actors share one GPU
    cfg, info = validate(harness()._config(workload, device, os.path.join(workload.root, "pipe-out"),
                                           batch_size=batch_size, num_actors=(actors, actors),
                                           gpus_per_actor=gpus_per_actor))
    started = time.perf_counter()
    summary = run_pipeline(cfg, info)
    wall = time.perf_counter() - started
    if summary["clips"] != workload.num_clips:
        raise RuntimeError(f"the pipeline wrote {summary['clips']} clips of {workload.num_clips}: {summary}")
    return {"pipeline_clips_per_s": workload.num_clips / wall, "pipeline_wall_s": wall,
            "pipeline_steady_clips_per_s": summary.get("steady_clips_per_s"),
            "pipeline_first_clip_s": summary.get("first_clip_s")}


def naive_loop(workload, device: str) -> dict:
    return harness().naive_loop(workload, device, None)


def full_size_cogvideox() -> dict:
    return harness()._full_size()


def save_cogvideox(folder: str, **overrides) -> str:
    from pipeline import samples

    return samples.make_tiny_vae(folder, **overrides)


def synthetic_clips(n: int, frames: int, height: int, width: int):
    """uint8 [n, 3, F, H, W], as the decode step hands clips to the encoder."""
    import numpy as np

    from pipeline import samples

    return np.stack([samples.synthetic_frames(frames, height, width, seed=i).transpose(3, 0, 1, 2)
                     for i in range(n)])


def family_ratios(class_name: str, config) -> dict:
    from pipeline.model import FAMILIES

    return FAMILIES[class_name](config)


def supported_families() -> set:
    from pipeline.model import FAMILIES

    return set(FAMILIES)


def encode_with_project(model: str, workdir: str, device: str, dtype: str, frames) -> dict:
    """The project's encoder, as a Ray actor runs it: VAEEncoder(cfg, info)(batch)."""
    import numpy as np

    from actors.encoder import VAEEncoder
    from pipeline.config import Config, validate

    n, _, f, h, w = frames.shape
    cfg, info = validate(Config(input=model, output=os.path.join(workdir, f"out-{device}-{dtype}"), model=model,
                                num_frames=f, height=h, width=w, device=device, dtype=dtype,
                                latent_dtype="float32", num_actors=(1, 1)))
    batch = {"frames": frames, "clip_id": np.array([f"clip{i}" for i in range(n)], dtype=object),
             "source_uri": np.array([f"clip{i}.mp4" for i in range(n)], dtype=object),
             "clip_index": np.arange(n, dtype=np.int32), "start_frame": np.zeros(n, np.int32),
             "num_frames": np.full(n, f, np.int32), "fps": np.full(n, 24.0),
             "height": np.full(n, h, np.int32), "width": np.full(n, w, np.int32)}
    return VAEEncoder(cfg, info)(batch)


# ---- Sections -------------------------------------------------------------------------------------

def _cuda_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


class Run:
    """What the sections share: the device, the options, a scratch folder, the generated workload
    (made once, by the first section that needs it) and the results so far."""

    def __init__(self, args, device: str):
        self.args, self.device = args, device
        # Known before any section runs, so the report names the card even if every section fails.
        self.device_name = _cuda_name() if device == "cuda" else "cpu"
        self.quick = args.quick
        self.scratch = tempfile.mkdtemp(prefix="vl-gpu-bench-")
        self._workload = None
        self.workload_info: dict | None = None
        self.results: dict[str, dict] = {}

    @property
    def batch_size(self) -> int:
        return self.args.batch_size or (1 if self.device == "cuda" else 2)

    def workload(self):
        if self._workload is None:
            videos, clips = WORKLOAD[(self.device, self.quick)]
            started = time.monotonic()
            w = make_workload(self.device, videos, clips, os.path.join(self.scratch, "workload"))
            self.workload_info = {"videos": videos, "clips": w.num_clips, "clip_shape": list(w.clip_shape),
                                  "model": "AutoencoderKLCogVideoX " + ("tiny" if self.device == "cpu" else "full-size")
                                  + " random-weight", "seconds_to_make": round(time.monotonic() - started, 1)}
            self._workload = w
        return self._workload

    def start_ray(self) -> None:
        """One local Ray for the pipeline sections, started the way bench.harness.main starts it."""
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)  # the bundle has no dashboard UI

    def close(self) -> None:
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        shutil.rmtree(self.scratch, ignore_errors=True)


def section_environment(run: Run) -> dict:
    import torch

    out = {"device": run.device, "python": sys.version.split()[0], "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "peak_bf16_tflops_table": dict(PEAK_BF16_TFLOPS), "modules": {},
           # Ray's object store falls back to /tmp (slower) when /dev/shm is small.
           "dev_shm_gib": round(shutil.disk_usage("/dev/shm").total / 2**30, 1) if os.path.isdir("/dev/shm") else None}
    for name in ("diffusers", "av", "ray", "pyarrow", "numpy", "accelerate"):
        try:
            module = __import__(name)
            out["modules"][name] = {"version": getattr(module, "__version__", None), "file": module.__file__}
        except ImportError as e:
            out["modules"][name] = {"error": str(e)}
    if run.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   peak_bf16_tflops=peak_bf16_tflops(props.name), driver_visible_gpus=torch.cuda.device_count())
    return out


def peak_bf16_tflops(name: str):
    """The card's dense bf16 peak (PEAK_BF16_TFLOPS), by device name; None when unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


# Each supported family as a diffusers class built with random weights: on CUDA with the class's
# own defaults (diffusers' architecture for the family), on the CPU with the tiny widths below.
# Wan 2.2 is Wan 2.1's class with its structure switched on: residual blocks and 2x2 patchified
# input (its released widths would be numbers copied from a model card: it keeps the defaults').
def _wan22_structure(tiny: dict) -> dict:
    import diffusers

    defaults = inspect.signature(diffusers.AutoencoderKLWan.__init__).parameters
    patch = 2
    levels = len(tiny.get("dim_mult", defaults["dim_mult"].default)) - 1
    return {**tiny, "is_residual": True, "patch_size": patch, "in_channels": 3 * patch * patch,
            "out_channels": 3 * patch * patch, "scale_factor_spatial": patch * 2 ** levels}


# family -> (diffusers class, constructor overrides on the CPU)
FAMILY_SPECS = {
    "CogVideoX": ("AutoencoderKLCogVideoX", dict(block_out_channels=(8, 8, 8, 8), latent_channels=4,
                                                 layers_per_block=1, norm_num_groups=2)),
    "HunyuanVideo": ("AutoencoderKLHunyuanVideo", dict(block_out_channels=(8, 8, 8, 8), latent_channels=4,
                                                       layers_per_block=1, norm_num_groups=4)),
    "Wan2.1": ("AutoencoderKLWan", dict(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1)),
    "Wan2.2": ("AutoencoderKLWan", dict(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1],
                                        num_res_blocks=1)),
    "LTX-Video": ("AutoencoderKLLTXVideo", dict(
        block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8), latent_channels=8,
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4)),
    "Mochi": ("AutoencoderKLMochi", dict(encoder_block_out_channels=(32, 32, 32, 32),
                                         decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1))),
    "HunyuanVideo1.5": ("AutoencoderKLHunyuanVideo15", dict(block_out_channels=(8, 8, 8, 8), latent_channels=4,
                                                            layers_per_block=1, spatial_compression_ratio=8,
                                                            temporal_compression_ratio=4)),
    "LTX-2": ("AutoencoderKLLTX2Video", dict(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                             decoder_block_out_channels=(8, 16, 32), layers_per_block=(1, 1, 1, 1, 1),
                                             decoder_layers_per_block=(1, 1, 1, 1), patch_size=2)),
}


def family_spec(family: str, device: str) -> tuple[str, dict]:
    class_name, tiny = FAMILY_SPECS[family]
    overrides = tiny if device == "cpu" else {}
    if family == "Wan2.2":
        overrides = _wan22_structure(overrides)
    return class_name, overrides


def section_family_correctness(run: Run) -> dict:
    missing = supported_families() - {cls for cls, _ in FAMILY_SPECS.values()}
    out = {"reference": "float32 on the CPU", "clips": FAMILY_CLIPS, "families": {},
           "not_covered": sorted(missing),
           "note": "float32 on CUDA convolves in TF32 when cudnn.allow_tf32 (see environment), as the "
                   "encoder does; float32_no_tf32 (CUDA only) turns TF32 off"}
    from diffusers.utils import logging as diffusers_logging

    # Casting a whole model with .to(dtype) is the point here; diffusers warns about it each time.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        for family in FAMILY_SPECS:
            try:
                out["families"][family] = family_errors(*family_spec(family, run.device), run.device)
            except SectionTimeout:
                raise
            except Exception as e:  # noqa: BLE001 - one family's failure must not hide the others
                out["families"][family] = {"error": f"{type(e).__name__}: {e}",
                                           "traceback": traceback.format_exc(limit=-4)}
            finally:
                release_memory(run.device)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    failed = sorted(f for f, r in out["families"].items() if "error" in r)
    problems = ([f"failed: {', '.join(failed)}"] if failed else []) + \
        ([f"supported but not covered here: {', '.join(sorted(missing))}"] if missing else [])
    if problems:
        raise PartialFailure(out, "; ".join(problems))
    return out


class PartialFailure(Exception):
    """A section that measured something but not everything: its result is kept."""

    def __init__(self, result: dict, message: str):
        super().__init__(message)
        self.result = result


def family_errors(class_name: str, overrides: dict, device: str) -> dict:
    """Encode the same clips with the same random weights: fp32 on the CPU (the reference), then
    fp32 and bf16 on the device, as the encoder loads the VAE (``keep_input_precision``); relative
    L2 error of each against the reference."""
    import diffusers
    import torch

    from actors.encoder import keep_input_precision

    torch.manual_seed(0)
    vae = getattr(diffusers, class_name)(**overrides).eval().requires_grad_(False)
    ratios = family_ratios(class_name, vae.config)
    if ratios.get("one_clip_per_call"):  # as the encoder runs it (diffusers 0.42.1 fails on a batch)
        vae.enable_slicing()
    frames = 2 * ratios["temporal_ratio"] + 1
    step = ratios["spatial_ratio"]
    size = -(-FAMILY_MIN_SIZE[device] // step) * step
    x = torch.from_numpy(synthetic_clips(FAMILY_CLIPS, frames, size, size)).float() / 127.5 - 1
    reference = _encode_raw(vae, x)
    errors = {}
    vae.to(device)
    for dtype in (torch.float32, torch.bfloat16):
        vae.to(dtype)
        hooks = keep_input_precision(vae, dtype)  # as the encoder loads it (Mochi's input stays float32)
        latents = _encode_raw(vae, x.to(device, vae.input_dtype))
        errors[str(dtype).removeprefix("torch.")] = rel_l2(latents, reference)
        if device == "cuda" and dtype == torch.float32:  # float32 as above is what the encoder gets
            # (TF32 convolutions, cuDNN's default); this one is float32 throughout
            errors["float32_no_tf32"] = rel_l2(_without_tf32(lambda: _encode_raw(vae, x.to(device, dtype))), reference)
        for hook in hooks:
            hook.remove()
    return {"class": class_name, "overrides": dict(overrides),
            "params_m": round(sum(p.numel() for p in vae.parameters()) / 1e6, 1),
            "clip_shape": [frames, size, size], "latent_shape": list(reference.shape[1:]),
            "rel_l2": errors, "finite": bool(torch.isfinite(reference).all())}


def _without_tf32(fn):
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return fn()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _encode_raw(vae, x):
    """The raw latent mean (before any normalisation), float64 on the CPU."""
    import torch

    with torch.inference_mode():
        z = vae.encode(x).latent_dist.mode()
    return z.double().cpu()


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| over all elements (numpy arrays or torch tensors)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def section_encoder_path(run: Run) -> dict:
    """The project's encoder (uint8 in, normalised latents out) on the device against the CPU."""
    work = os.path.join(run.scratch, "encoder")
    model = save_cogvideox(os.path.join(work, "model"), **(full_size_cogvideox() if run.device == "cuda" else {}))
    frames = synthetic_clips(ENCODER_CLIPS, *ENCODER_SHAPE[run.device])
    reference = encode_with_project(model, work, "cpu", "float32", frames)
    out = {"model": "AutoencoderKLCogVideoX " + ("full-size" if run.device == "cuda" else "tiny") + " random-weight",
           "clip_shape": list(frames.shape[2:]), "clips": len(frames), "reference": "VAEEncoder on the CPU, float32",
           "rel_l2": {}}
    for dtype in ("float32", "bfloat16"):
        got = encode_with_project(model, work, run.device, dtype, frames)
        if list(got["clip_id"]) != list(reference["clip_id"]) or got["latents"].shape != reference["latents"].shape:
            raise RuntimeError(f"{dtype}: clips {list(got['clip_id'])} of shape {got['latents'].shape}, "
                               f"expected {list(reference['clip_id'])} of {reference['latents'].shape}")
        out["rel_l2"][dtype] = rel_l2(got["latents"], reference["latents"])
        release_memory(run.device)
    out["latent_shape"] = list(reference["latents"].shape[1:])
    return out


def section_isolated(run: Run) -> dict:
    """Clips/s of the encode step alone (clips already decoded, one warm-up batch excluded), the
    FLOPs of one clip as torch counts them, and what that makes per second against the card's peak."""
    w = run.workload()
    measured = isolated_encode(w, run.device, run.batch_size)
    out = {"clip_shape": list(w.clip_shape), "clips": w.num_clips, "batch_size": run.batch_size,
           "dtype": "bfloat16" if run.device == "cuda" else "float32",
           "isolated_clips_per_s": measured["isolated_clips_per_s"]}
    # bench.harness counts one clip's FLOPs on CUDA (FlopCounterMode); elsewhere they are counted here.
    flops = measured["tflops_per_clip"] * 1e12 if "tflops_per_clip" in measured else count_flops_per_clip(w, run.device)
    achieved = flops * out["isolated_clips_per_s"] / 1e12
    peak = peak_bf16_tflops(run.device_name) if run.device == "cuda" else None
    out.update(flops_counted_by="torch.utils.flop_counter.FlopCounterMode, one clip",
               tflops_per_clip=round(flops / 1e12, 6), achieved_tflops=round(achieved, 3),
               peak_bf16_tflops=peak, mfu=round(achieved / peak, 4) if peak else None)
    return out


def section_pipeline(run: Run) -> dict:
    w = run.workload()
    run.start_ray()
    out = {"clips": w.num_clips, "batch_size": run.batch_size, "decode_cpus": os.cpu_count(),
           **pipeline_run(w, run.device, run.batch_size)}
    import ray

    out["ray_resources"] = {k: v for k, v in ray.cluster_resources().items()
                            if k in ("CPU", "GPU", "memory", "object_store_memory")}
    isolated = run.results.get("isolated", {}).get("isolated_clips_per_s")
    out["pipeline_vs_isolated"] = _ratio(out["pipeline_clips_per_s"], isolated)
    out["pipeline_vs_isolated_steady"] = _ratio(out["pipeline_steady_clips_per_s"], isolated)
    return out


def section_naive(run: Run) -> dict:
    w = run.workload()
    out = {"clips": w.num_clips, **naive_loop(w, run.device)}
    pipeline = run.results.get("pipeline", {}).get("pipeline_clips_per_s")
    out["pipeline_vs_naive"] = _ratio(pipeline, out["naive_clips_per_s"])
    return out


def section_sweep(run: Run) -> dict:
    w = run.workload()
    run.start_ray()
    batch_sizes, actor_counts = SWEEP[(run.device, run.quick)]
    rows = []
    for actors in actor_counts:
        for bs in batch_sizes:
            row = {"batch_size": bs, "actors": actors,
                   "gpus_per_actor": round(1.0 / actors, 3) if run.device == "cuda" else 0}
            try:
                r = pipeline_run(w, run.device, bs, actors)
                row.update(clips_per_s=round(r["pipeline_clips_per_s"], 3), wall_s=round(r["pipeline_wall_s"], 2),
                           steady_clips_per_s=_round(r["pipeline_steady_clips_per_s"]))
            except SectionTimeout:
                rows.append({**row, "skipped": "time budget ran out"})
                raise PartialFailure({"points": rows}, "time budget ran out during the sweep") from None
            except Exception as e:  # noqa: BLE001 - one point (say, out of memory) must not end the sweep
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(f"bench.gpu: sweep {row}", flush=True)
    failed = [r for r in rows if "error" in r]
    if failed:
        raise PartialFailure({"points": rows}, f"{len(failed)} of {len(rows)} sweep points failed")
    return {"points": rows, "clips": w.num_clips}


def section_levers(run: Run) -> dict:
    """Each switchable lever flipped, one at a time, in the isolated encode (same clips and dtype as
    the isolated section), measured back to back with the default, A B A B (A B C A B C), so the
    machine's drift falls on all. Clips/s of each, and for the memory format how far its latents are
    from the default's (the first batch, rel-L2), beside the default's distance from its own rerun.

    batch_size: the isolated encode at each of LEVER_BATCHES, with its peak GPU memory, beside the
    batch the encoder's own search picks on this device (``VAEEncoder._fit_batch``: the largest that
    fits, the CLI's default on CUDA). memory_format: on the CPU only now; on CUDA it was measured on
    the first GPU run (channels_last_3d 0.65x contiguous on an H200, bench/results/gpu-h200-2026-12-04.json)."""
    w = run.workload()
    out = {"clip_shape": list(w.clip_shape), "batch_size": _batch_lever(w, run)}
    if run.device == "cuda":
        out["memory_format"] = {"skipped": "measured on CUDA on 2026-12-04 (channels_last_3d 0.65x "
                                           "contiguous, H200): bench/results/gpu-h200-2026-12-04.json"}
        return out
    default = auto_memory_format(run.device)
    other = "contiguous" if default == "channels_last_3d" else "channels_last_3d"
    runs = {default: [], other: []}
    for fmt in (default, other, default, other):
        runs[fmt].append(isolated_encode(w, run.device, run.batch_size, lever_format=fmt))
        release_memory(run.device)
    speed = {fmt: round(statistics.median(r["isolated_clips_per_s"] for r in rs), 4) for fmt, rs in runs.items()}
    base = runs[default][0]["first_latents"]
    out["memory_format"] = {
        "default": default, "tried": other, "runs_each": 2, "batch_size": run.batch_size,
        "default_clips_per_s": speed[default], "tried_clips_per_s": speed[other],
        "vs_default": _ratio(speed[other], speed[default]),
        "rel_l2_vs_default": rel_l2(runs[other][0]["first_latents"], base),
        "rel_l2_default_rerun": rel_l2(runs[default][1]["first_latents"], base)}
    return out


def _batch_lever(w, run: Run) -> dict:
    sizes = LEVER_BATCHES[run.device]
    runs = {bs: [] for bs in sizes}
    for _ in range(2):
        for bs in sizes:
            runs[bs].append(isolated_encode(w, run.device, bs, lever_format=auto_memory_format(run.device)))
            release_memory(run.device)
    points = [{"batch_size": bs, "clips_per_s": round(statistics.median(r["isolated_clips_per_s"] for r in rs), 4),
               "runs": [round(r["isolated_clips_per_s"], 4) for r in rs],
               "peak_memory_gib": rs[-1].get("peak_memory_gib")} for bs, rs in runs.items()]
    best = max(points, key=lambda p: p["clips_per_s"])["batch_size"]
    return {"points": points, "best": best, "encoder_picks": fitted_batch(w, run.device)}


def fitted_batch(w, device: str) -> int | None:
    """The batch the encoder picks when --batch-size is not given (its memory search on CUDA)."""
    if device != "cuda":
        return None
    from actors.encoder import VAEEncoder
    from pipeline.config import validate

    cfg, info = validate(harness()._config(w, device, os.path.join(w.root, "fit-out"), batch_size=None))
    cfg = cfg.replace(dtype="bfloat16", num_actors=(1, 1), batch_size=None)
    try:
        return VAEEncoder(cfg, info).chunk
    finally:
        release_memory(device)


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def _round(x):
    return None if x is None else round(x, 3)


def release_memory(device: str) -> None:
    """Give back the driver's cached GPU memory: the pipeline's actors need it next."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# ---- Running the sections within the budget, and the report ----------------------------------------

class Report:
    def __init__(self, path: str, run: Run):
        self.path, self.run = path, run
        self.started = time.monotonic()
        self.data = {"schema": "video-latents bench.gpu v1", "device": run.device, "device_name": run.device_name,
                     "cpu_fallback": run.device == "cpu", "quick": run.quick, "budget_s": run.args.budget_s,
                     "command": [sys.executable, "-m", "bench.gpu", *sys.argv[1:]],
                     "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "finished": False, "sections": {}}
        if run.device == "cpu":
            self.data["note"] = ("no CUDA device: CPU fallback with small shapes and tiny models; "
                                 "these figures only show that the benchmark runs")

    def section(self, name: str, record: dict) -> None:
        self.data["sections"][name] = record
        self.save()

    def save(self) -> None:
        d = self.data
        d["elapsed_s"] = round(time.monotonic() - self.started, 1)
        d["workload"] = self.run.workload_info  # generated by the first section that needed it
        d.update(headline(self.run))
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(d, f, indent=1, default=str)
        os.replace(tmp, self.path)  # a reader (or a kill) never sees half a file


def headline(run: Run) -> dict:
    """The figures the issue asks for, lifted out of their sections (None until measured)."""
    iso, pipe, naive = (run.results.get(k, {}) for k in ("isolated", "pipeline", "naive"))
    return {
        "device_name": run.device_name, "peak_bf16_tflops": iso.get("peak_bf16_tflops"),
        "mfu": iso.get("mfu"), "tflops_per_clip": iso.get("tflops_per_clip"),
        "achieved_tflops": iso.get("achieved_tflops"),
        "isolated_clips_per_s": _round(iso.get("isolated_clips_per_s")),
        "pipeline_clips_per_s": _round(pipe.get("pipeline_clips_per_s")),
        "pipeline_steady_clips_per_s": _round(pipe.get("pipeline_steady_clips_per_s")),
        "naive_clips_per_s": _round(naive.get("naive_clips_per_s")),
        # whole runs (start-up included) against the isolated ceiling and the naive script ...
        "pipeline_vs_isolated": _ratio(pipe.get("pipeline_clips_per_s"), iso.get("isolated_clips_per_s")),
        "pipeline_vs_naive": _ratio(pipe.get("pipeline_clips_per_s"), naive.get("naive_clips_per_s")),
        # ... and the pipeline in steady state against the isolated encode (both without start-up)
        "pipeline_vs_isolated_steady": _ratio(pipe.get("pipeline_steady_clips_per_s"),
                                              iso.get("isolated_clips_per_s")),
    }


def _on_alarm(signum, frame):
    raise SectionTimeout("the time budget ran out during this section")


def run_section(run: Run, report: Report, name: str, fn, deadline: float) -> str:
    """Run one section under what is left of the budget; record its result, error or skip."""
    left = deadline - time.monotonic()
    if left <= 0:
        report.section(name, {"status": "skipped", "reason": "time budget spent before it started"})
        return "skipped"
    print(f"bench.gpu: {name} ({left:.0f} s of budget left)", flush=True)
    started = time.monotonic()
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, left)
        try:
            result = fn(run)
        finally:  # before any handler below runs, so none of them is interrupted
            signal.setitimer(signal.ITIMER_REAL, 0)
        record = {"status": "ok", "result": result}
    except PartialFailure as e:
        result, record = e.result, {"status": "error", "error": str(e), "result": e.result}
    except SectionTimeout as e:
        result, record = {}, {"status": "interrupted", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
        result, record = {}, {"status": "error", "error": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc(limit=-8)}
    run.results[name] = result
    record["seconds"] = round(time.monotonic() - started, 1)
    report.section(name, record)
    release_memory(run.device)
    print(f"bench.gpu: {name}: {record['status']} in {record['seconds']} s"
          + (f": {record['error']}" if "error" in record else ""), flush=True)
    return record["status"]


def choose_device(requested: str) -> str:
    if requested == "cpu":  # decided without torch: the report is written even where it is missing
        return "cpu"
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.gpu: --device cuda, but torch sees no CUDA device")
    return requested


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help=f"folder for {REPORT_NAME}")
    p.add_argument("--quick", action="store_true", help="fewer clips and sweep points")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for all sections; the rest are skipped once spent")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="default: 1 on cuda, 2 on cpu (as bench.harness)")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    deadline = time.monotonic() + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    run = Run(args, choose_device(args.device))
    report = Report(os.path.join(args.out, REPORT_NAME), run)
    statuses = []
    try:
        for name in SECTIONS:
            if name not in only:
                report.section(name, {"status": "skipped", "reason": "not in --only"})
                continue
            statuses.append(run_section(run, report, name, globals()[f"section_{name}"], deadline))
    finally:
        run.close()
        report.data["finished"] = True
        report.save()
    print(json.dumps({k: v for k, v in report.data.items() if k != "sections"}), flush=True)
    print(f"bench.gpu: wrote {report.path}", flush=True)
    return 1 if {"error", "interrupted"} & set(statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
