"""The CLI with its defaults against a naive loop, both started as a user starts them, on the same
videos in a local S3 server. Never run as a test.

  python -m bench.defaults [--videos 60] [--clips-per-video 1] [--repeats 1]

(a) ``python -m pipeline encode s3://... s3://... --model M`` with the shape options only, timed
from outside (a fresh process: imports, Ray's start, the actor's model load, everything);
(b) the naive script in a fresh process: for each video, read it from S3, decode it whole,
resize and normalise on the CPU, encode clip by clip (as the CogVideo DDIM-inversion script).
Also reported, from the CLI's own summary: time to the first encoded clip and the steady-state
clips/s (start-up excluded), against the isolated encode of the same clips at the batch size the
CLI chose, measured in a fresh process right after each CLI/naive pair (the headline is the median
of the per-run ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench.harness import SHAPES, SMALL_COGVIDEOX, moto_s3
from pipeline.config import CPU_BATCH


def _s3_env(endpoint: str) -> dict:
    return {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "RAY_ADDRESS": "",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def make_inputs(root: str, videos: int, clips_per_video: int, endpoint: str) -> tuple[str, tuple]:
    import boto3

    from pipeline import samples

    (f, h, w), (src_h, src_w) = SHAPES["cpu"]
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
                          aws_secret_access_key="bench", region_name="us-east-1")
    client.create_bucket(Bucket="bench")
    for i in range(videos):
        path = samples.write_video(os.path.join(root, "v", f"v{i:03d}.mp4"),
                                   samples.synthetic_frames(f * clips_per_video, src_h, src_w, seed=i))
        client.upload_file(path, "bench", f"in/v{i:03d}.mp4")
    model = samples.make_tiny_vae(os.path.join(root, "model"), **SMALL_COGVIDEOX)
    return model, (f, h, w)


def run_cli(model: str, shape, endpoint: str, output: str, extra: list[str] = (), env: dict | None = None) -> dict:
    """One CLI run, timed from outside. The run's own clock starts inside the process, after its
    imports, and the process lives on after the summary while Ray shuts down; so the run's start
    is placed by the moment its summary line arrives (unbuffered stdout) less the run's own time,
    and start-up is that plus the first clip's time."""
    f, h, w = shape
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "encode", "s3://bench/in", f"s3://bench/{output}",
                             "--model", model, "--num-frames", str(f), "--height", str(h), "--width", str(w), *extra],
                            env={**_s3_env(endpoint), "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    drain.start()
    summary_at, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("{"):
            summary_at = time.perf_counter()
    proc.wait()
    wall = time.perf_counter() - start
    drain.join()
    stderr = "".join(err)
    if proc.returncode or summary_at is None:
        raise RuntimeError(stderr[-3000:])
    summary = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    run_started = summary_at - start - summary["wall_time_s"]  # seconds after the process started
    plan = next((line for line in stderr.splitlines() if "plan:" in line), "")
    return {"cli_wall_s": round(wall, 2), "cli_clips": summary["clips"], "cli_run_s": summary["wall_time_s"],
            "cli_first_clip_s": summary["first_clip_s"], "cli_steady_clips_per_s": summary["steady_clips_per_s"],
            "cli_startup_s": round(run_started + (summary["first_clip_s"] or 0), 2),
            "cli_before_run_s": round(run_started, 2), "cli_after_summary_s": round(wall - (summary_at - start), 2),
            "cli_plan": plan.split("plan: ", 1)[-1]}


NAIVE = r'''
import io, json, sys, boto3, av, numpy as np, torch
from diffusers import AutoencoderKLCogVideoX
model, f, h, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
vae = AutoencoderKLCogVideoX.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32).eval()
s3 = boto3.client("s3")
clips = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="in/"):
    for item in page.get("Contents", []):
        data = s3.get_object(Bucket="bench", Key=item["Key"])["Body"].read()
        with av.open(io.BytesIO(data)) as c:
            video = np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)])
        x = torch.from_numpy(video).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = (x / 127.5 - 1).permute(1, 0, 2, 3)
        for s in range(0, x.shape[1] - f + 1, f):
            with torch.no_grad():
                z = vae.encode(x[None, :, s:s + f]).latent_dist.mode() * vae.config.scaling_factor
            clips += 1
print(json.dumps({"clips": clips}))
'''


def run_naive(model: str, shape, endpoint: str) -> dict:
    f, h, w = shape
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", NAIVE, model, str(f), str(h), str(w)], env=_s3_env(endpoint),
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return {"naive_wall_s": round(wall, 2), "naive_clips": json.loads(proc.stdout.strip().splitlines()[-1])["clips"]}


ISOLATED = r'''
import json, sys
from bench.harness import Workload, isolated_encode
root, model, videos, f, h, w, n, batch = sys.argv[1:]
work = Workload(root, model, videos, (int(f), int(h), int(w)), int(n))
print(json.dumps(isolated_encode(work, "cpu", int(batch), None)))
'''


def run_isolated(root: str, model: str, shape, clips: int, batch_size: int) -> float:
    """The actor's encode step alone, in a fresh process as the actor is (its allocator settings
    and threads), on the same videos decoded into memory first: clips/s."""
    proc = subprocess.run([sys.executable, "-c", ISOLATED, root, model, os.path.join(root, "v"), *map(str, shape),
                           str(clips), str(batch_size)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["isolated_clips_per_s"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.defaults", description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=60)
    p.add_argument("--clips-per-video", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="alternate CLI and naive runs this many times")
    p.add_argument("--variants", default="", help="JSON list of [label, [CLI options], {env}] to time too "
                                                  "(levers; the defaults are always run)")
    p.add_argument("--out", default="", help="also write the result JSON here (bench/results/defaults-cpu.json)")
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="vl-defaults-")
    with moto_s3() as endpoint:
        try:
            os.environ.update({k: v for k, v in _s3_env(endpoint).items() if k.startswith("AWS_")})
            model, shape = make_inputs(root, args.videos, args.clips_per_video, endpoint)
            runs, variants = [], []
            for i in range(args.repeats):
                runs.append({**run_cli(model, shape, endpoint, f"out{i}"), **run_naive(model, shape, endpoint)})
                # The ceiling measured beside each run, not once: both drift with the machine's state.
                runs[-1]["isolated_clips_per_s"] = round(
                    run_isolated(root, model, shape, runs[-1]["cli_clips"], CPU_BATCH), 3)
                runs[-1]["steady_vs_isolated"] = round(
                    runs[-1]["cli_steady_clips_per_s"] / runs[-1]["isolated_clips_per_s"], 3)
                print(json.dumps(runs[-1]), flush=True)
                for label, extra, env in json.loads(args.variants or "[]"):
                    variants.append({"variant": label, **run_cli(model, shape, endpoint, f"var{i}-{len(variants)}",
                                                                 extra, env)})
                    print(json.dumps(variants[-1]), flush=True)
            best_cli = min(r["cli_wall_s"] for r in runs)
            best_naive = min(r["naive_wall_s"] for r in runs)
            isolated = statistics.median(r["isolated_clips_per_s"] for r in runs)
            result = {"date": time.strftime("%Y-%m-%d"),
                      "command": "PYTHONPATH=. python -m bench.defaults " + " ".join(argv if argv is not None else sys.argv[1:]),
                      "videos": args.videos, "clips": runs[0]["cli_clips"], "clip_shape": list(shape),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": runs,
                      "variants": variants, "cli_wall_s": best_cli, "naive_wall_s": best_naive,
                      "cli_vs_naive": round(best_naive / best_cli, 3),
                      "cli_vs_naive_per_pair": [round(r["naive_wall_s"] / r["cli_wall_s"], 3) for r in runs],
                      "isolated_clips_per_s": round(isolated, 3),
                      "cli_steady_clips_per_s": statistics.median(r["cli_steady_clips_per_s"] for r in runs),
                      # each run's steady state against the isolated encode measured after its pair
                      "pipeline_vs_isolated_steady_per_run": [r["steady_vs_isolated"] for r in runs],
                      "pipeline_vs_isolated_steady": statistics.median(r["steady_vs_isolated"] for r in runs)}
            print(json.dumps(result))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
            return result
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
