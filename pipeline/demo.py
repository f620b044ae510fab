"""``python -m pipeline demo``: the whole job on an embedded default, on this machine.

Generates sample videos (one broken, one too short) and a tiny random-weight CogVideoX VAE,
encodes them with a local Ray into a local folder, and reads the result back.
"""
from __future__ import annotations

import json
import os

from pipeline import samples
from pipeline.cli import EXIT_OK, encode
from pipeline.config import Config

# The tiny VAE compresses 8x in space and 4x in time, like the real one: 9 frames -> 3 latents.
DEMO_SHAPE = dict(num_frames=9, height=64, width=96)


def demo(workdir: str) -> int:
    videos, model, output = (os.path.join(workdir, d) for d in ("videos", "model", "output"))
    samples.make_sample_videos(videos)
    samples.make_tiny_vae(model)
    print(f"demo: sample videos in {videos}, tiny VAE in {model}")
    cfg = Config(input=videos, output=output, model=model, batch_size=4, overwrite=True, **DEMO_SHAPE)
    code = encode(cfg)
    if code == EXIT_OK:
        show(output)
    return code


def show(output: str) -> None:
    import pyarrow.dataset as pads

    latents = pads.dataset(os.path.join(output, "latents"), format="parquet").to_table()
    errors = pads.dataset(os.path.join(output, "errors"), format="parquet").to_table()
    meta = json.loads(latents.schema.metadata[b"video_latents"])
    first = latents.column("latents").combine_chunks().to_numpy_ndarray()
    print(f"\ndemo: {latents.num_rows} clips in {output}/latents, latents {first.dtype} "
          f"{list(first.shape[1:])} ({meta['layout']}), {meta['vae_class']} "
          f"x scaling_factor {meta['scaling_factor']}")
    rows = latents.select(["source_uri", "clip_index", "start_frame"]).to_pylist()
    for row in sorted(rows, key=lambda r: (r["source_uri"], r["clip_index"])):
        print(f"  clip {row['clip_index']} @ frame {row['start_frame']:>3}  {row['source_uri']}")
    print(f"demo: {errors.num_rows} error rows in {output}/errors")
    for row in errors.select(["source_uri", "stage", "error_type", "message"]).to_pylist():
        print(f"  {row['stage']}/{row['error_type']}: {row['source_uri']}: {row['message']}")
