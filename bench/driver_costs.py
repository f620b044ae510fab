"""What the driver pays as a dataset grows: listing and planning N inputs (wall time, the driver
process's peak memory), and S3 requests per clip for a normal run. Never run as a test.

  python -m bench.driver_costs [--inputs 100000] [--s3-videos 20]

The inputs are a generated local tree of hard links to a few small videos (so making 100,000 of
them is quick); listing streams them in pages, and ``plan`` probes every one through Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

from bench.harness import RssSampler, moto_s3


def make_tree(root: str, n: int, per_folder: int = 1000) -> str:
    from pipeline import samples

    sources = [samples.write_video(os.path.join(root, "src", f"s{i}.mp4"),
                                   samples.synthetic_frames(9 * (i + 1), 64, 64, i)) for i in range(4)]
    tree = os.path.join(root, "tree")
    for i in range(n):
        folder = os.path.join(tree, f"d{i // per_folder:04d}")
        if i % per_folder == 0:
            os.makedirs(folder, exist_ok=True)
        os.link(sources[i % len(sources)], os.path.join(folder, f"v{i:07d}.mp4"))
    return tree


def listing_and_plan(n: int) -> dict:
    import ray

    from pipeline import sources
    from pipeline.commands.plan import plan
    from pipeline.config import Config, validate

    root = tempfile.mkdtemp(prefix="vl-driver-")
    try:
        t = time.perf_counter()
        tree = make_tree(root, n)
        made = time.perf_counter() - t
        from pipeline import samples

        model = samples.make_tiny_vae(os.path.join(root, "model"))
        cfg, info = validate(Config(input=tree, output=os.path.join(root, "out"), model=model, num_frames=9,
                                    height=64, width=64))
        with RssSampler(0.05, children=False) as listing_rss:
            t = time.perf_counter()
            listed = sum(len(page) for page in sources.iter_pages(cfg))
            listing_s = time.perf_counter() - t
        ray.init(include_dashboard=False, log_to_driver=False)
        with RssSampler(0.05, children=False) as plan_rss:
            t = time.perf_counter()
            result = plan(cfg, info)
            plan_s = time.perf_counter() - t
        ray.shutdown()
        return {"inputs": n, "tree_made_s": round(made, 1), "listed": listed, "listing_s": round(listing_s, 2),
                "listing_driver_peak_growth_mb": listing_rss.growth_mb, "plan_s": round(plan_s, 1),
                "plan_inputs_per_s": round(n / plan_s, 1), "plan_driver_peak_growth_mb": plan_rss.growth_mb,
                "plan_clips": result["clips"], "driver_maxrss_mb": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def s3_requests_per_clip(videos: int) -> dict:
    """A normal run, input and output on a local S3 server, through a proxy that counts requests."""
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    import boto3

    from pipeline import samples
    from pipeline.cli import main
    from tests.faultproxy import FaultProxy

    root = tempfile.mkdtemp(prefix="vl-s3-")
    with moto_s3() as endpoint:
        try:
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket="bench")
            for i in range(videos):
                path = samples.write_video(os.path.join(root, f"v{i}.mp4"), samples.synthetic_frames(27, 64, 64, i))
                client.upload_file(path, "bench", f"in/v{i:03d}.mp4")
            model = samples.make_tiny_vae(os.path.join(root, "model"))
            requests = []
            with FaultProxy(endpoint, schedule=lambda n, method, path: requests.append((method, path)) and None) as proxy:
                code = main(["encode", "s3://bench/in", "s3://bench/out", "--model", model, "--num-frames", "9",
                             "--height", "64", "--width", "64", "--s3-endpoint", proxy.endpoint])
            assert code == 0
            clips = videos * 3
            by_method = {m: sum(1 for x, _ in requests if x == m) for m in sorted({m for m, _ in requests})}
            writes = sum(1 for m, p in requests if m in ("PUT", "POST") and "/out/" in p)
            return {"s3_videos": videos, "s3_clips": clips, "s3_requests": len(requests),
                    "s3_requests_per_clip": round(len(requests) / clips, 2), "s3_requests_by_method": by_method,
                    "s3_write_requests": writes}
        finally:
            shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.driver_costs", description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=100_000)
    p.add_argument("--s3-videos", type=int, default=20)
    args = p.parse_args(argv)
    result = {**listing_and_plan(args.inputs)}
    result.update(s3_requests_per_clip(args.s3_videos))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
