"""``python -m pipeline inspect OUTPUT``: what a run wrote, at a glance."""
from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline import sink, storage


def summarize(output: str, s3_endpoint: str | None = None) -> dict:
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None

    def dataset(folder):
        fs, path = storage.resolve(storage.join(output, folder), endpoint)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        return pads.dataset(path, filesystem=fs, format="parquet")

    out: dict = {"output": output}
    latents = dataset(sink.LATENTS_DIR)
    if latents is not None and latents.files:
        schema = latents.schema
        meta = json.loads(schema.metadata[sink.METADATA_KEY]) if schema.metadata else {}
        tensors = {f.name: f.type for f in schema if f.name in ("latents", "latents_mean", "latents_logvar")}
        sources = latents.to_table(columns=["source_uri"]).column("source_uri")
        out.update(clips=latents.count_rows(), files=len(latents.files),
                   videos_with_clips=len(set(sources.to_pylist())),
                   tensors={k: {"shape": list(t.shape), "dtype": str(t.value_type)} for k, t in tensors.items()},
                   model=meta.get("model"), vae_class=meta.get("vae_class"),
                   latent_mode=meta.get("latent_mode"), layout=meta.get("layout"),
                   scaling_factor=meta.get("scaling_factor"), versions=meta.get("versions"))
    else:
        out.update(clips=0, files=0)
    errors = dataset(sink.ERRORS_DIR)
    if errors is not None and errors.files:
        rows = errors.to_table(columns=["stage", "error_type"]).to_pylist()
        out["errors"] = len(rows)
        out["errors_by_type"] = dict(Counter(f"{r['stage']}/{r['error_type']}" for r in rows).most_common())
    else:
        out["errors"], out["errors_by_type"] = 0, {}
    try:
        success = json.loads(storage.read_bytes(storage.join(output, sink.SUCCESS), endpoint))
        out["complete"] = True
        out.update({k: success.get(k) for k in ("videos", "wall_time_s", "clips_per_s")})
    except (FileNotFoundError, OSError):
        out["complete"] = False  # running, interrupted, or not an OUTPUT of ours
    return out


def inspect_command(output: str, s3_endpoint: str | None, as_json: bool) -> int:
    summary = summarize(output, s3_endpoint)
    if as_json:
        print(json.dumps(summary))
        return 0
    state = "complete" if summary["complete"] else "no _SUCCESS: running, interrupted or resumable"
    print(f"{output}: {state}")
    print(f"  clips      {summary['clips']} in {summary['files']} files"
          + (f", from {summary.get('videos_with_clips')} of {summary.get('videos')} videos"
             if summary.get("videos") is not None else ""))
    for name, t in summary.get("tensors", {}).items():
        print(f"  {name:<10} {t['dtype']} {t['shape']} ({summary.get('layout')})")
    if summary.get("vae_class"):
        print(f"  model      {summary['model']} ({summary['vae_class']}, {summary['latent_mode']}, "
              f"scaling_factor {summary['scaling_factor']})")
    print(f"  errors     {summary['errors']}")
    for kind, n in summary["errors_by_type"].items():
        print(f"    {n:>6}  {kind}")
    if summary.get("clips_per_s") is not None:
        print(f"  throughput {summary['clips_per_s']} clips/s over {summary['wall_time_s']} s")
    return 0
