"""The job's identity: every setting that determines the output's values and ids.

The first run into an OUTPUT records it in ``OUTPUT/_job.json`` before writing anything else; a
rerun compares and refuses any difference (exit 2, OUTPUT untouched), so a rerun with another
model, mode or size can never leave old latents under a new report. Settings that cannot change
the output (actors, batch size, device, limits, endpoint, retries) are not part of it. Inputs
added under INPUT (or rows appended to a manifest) are new work for the same job, not a change.
"""
from __future__ import annotations

import hashlib
import json
import os

from pipeline import layout, storage
from pipeline.config import Config, ConfigError
from pipeline.model import ModelInfo
from pipeline.text import text_dtype

VERSION = 1


def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _where(uri: str | None) -> str | None:
    if uri is None:
        return None
    return uri.rstrip("/") if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def identity(cfg: Config, info: ModelInfo) -> dict:
    """{option as the user knows it: value}. ``--dtype`` is None until the device is known."""
    return {
        "--model": cfg.model,
        "--subfolder": info.subfolder,
        "VAE class": info.class_name,
        "model config": _digest(info.config),
        "model weights": _digest(info.files) if info.files else "unknown (hub id: not fingerprinted)",
        "normalisation": _digest(info.normalization()),
        "--latent-mode": cfg.latent_mode,
        "--seed": cfg.seed if cfg.latent_mode == "sample" else None,
        "--dtype": cfg.dtype,
        "--latent-dtype": cfg.latent_dtype,
        "--num-frames": cfg.num_frames,
        "--height": cfg.height,
        "--width": cfg.width,
        "--resize": cfg.resize,
        "--buckets": ",".join(f"{h}x{w}" for h, w in cfg.buckets) or None,
        "--fps": cfg.fps,
        "--clip-stride": cfg.stride,
        "--max-clips": cfg.max_clips,
        "--tiling": cfg.tiling,  # tiles are blended at their seams: other values
        # Off: None, so that jobs recorded before these options existed keep their identity.
        "--text-embeddings": _digest(info.text.identity()) if cfg.text_embeddings and info.text else None,
        "--caption-column": cfg.caption_field if cfg.text_embeddings and cfg.manifest else None,
        "text dtype": text_dtype(cfg) if cfg.text_embeddings else None,
        "--image-latents": True if cfg.image_latents else None,
        "INPUT": _where(cfg.input),
        "--manifest": _where(cfg.manifest),
        "manifest columns": [list(c) for c in cfg.extra_columns] or None,
    }


def fingerprint(ident: dict) -> str:
    return _digest({"version": VERSION, **ident})


def record(cfg: Config, info: ModelInfo) -> dict:
    """The identity as the run records it (the compute dtype resolved)."""
    ident = identity(cfg, info)
    return {"version": VERSION, "fingerprint": fingerprint(ident), "identity": ident}


class JobMismatch(ConfigError):
    """OUTPUT belongs to a job with other settings."""


def _differences(recorded: dict, current: dict) -> list[str]:
    lines = []
    for key in [*current, *(k for k in recorded if k not in current)]:
        old, new = recorded.get(key), current.get(key)
        if key in ("--dtype", "text dtype") and new is None:
            continue  # not given: compared once the device is known
        if old != new:
            lines.append(f"{key}: {_show(old)} -> {_show(new)}")
    return lines


def _show(value) -> str:
    return "(none)" if value is None else str(value)


def check(cfg: Config, info: ModelInfo) -> bool:
    """Compare with what OUTPUT recorded. True when OUTPUT has a matching record; False when there
    is none to honour (a new OUTPUT, --overwrite, or a record with no result written under it).
    Raises JobMismatch, whose message lists each differing setting and the ways forward."""
    if cfg.overwrite:
        return False
    recorded = layout.read_json(cfg.output, layout.JOB, cfg.s3)
    if recorded is None:
        if layout.has_results(cfg.output, cfg.s3):
            raise JobMismatch(f"OUTPUT {cfg.output} holds results but no {layout.JOB} (written by an "
                              "older version, or not by this tool): pass --overwrite to start afresh, "
                              "or choose another OUTPUT")
        return False
    lines = _differences(recorded.get("identity", {}), identity(cfg, info))
    if not lines:
        return True
    if not layout.has_results(cfg.output, cfg.s3):
        return False  # nothing was written under the old settings: the new ones replace them
    raise JobMismatch(
        f"OUTPUT {cfg.output} holds the results of a job with other settings:\n"
        + "\n".join(f"  {line}" for line in lines)
        + "\nPass --overwrite to delete them and start afresh, or choose another OUTPUT.")


def write(cfg: Config, info: ModelInfo) -> dict:
    """Record the job in OUTPUT (before anything else is written); returns the record."""
    rec = record(cfg, info)
    layout.write_json(cfg.output, layout.JOB, rec, cfg.s3)
    return rec
