"""The job's identity: every setting that determines the output's values and ids.

The first run into an OUTPUT records it in ``OUTPUT/_job.json`` before writing anything else; a
rerun compares and refuses any difference (exit 2, OUTPUT untouched), so a rerun with another
model, mode or size can never leave old latents under a new report. Settings that cannot change
the output (actors, batch size, device, limits, endpoint, retries) are not part of it. Inputs
added under INPUT (or rows appended to a manifest) are new work for the same job, not a change.

The record also holds the diffusers and torch versions the run used: a rerun whose major.minor
differs is refused unless --allow-version-change, and each change so accepted is listed in the
record; patch releases are free.
"""
from __future__ import annotations

import hashlib
import json
import os

from pipeline import layout, storage
from pipeline.config import Config, ConfigError, memory_format
from pipeline.model import ModelInfo, looks_like_hub_id
from pipeline.text import text_dtype

VERSION = 1
# A value that depends on the device, before the device is known (the check before Ray starts):
# compared by the run's second check, once it is.
PENDING = "(known once the device is)"
# Identity entries added after jobs were first recorded that an older record cannot be held to:
# what a hub id's branch pointed to then, every byte of the text encoder then. An older record
# without them is honoured as it is, and the run records them from then on.
NOT_KNOWN_BEFORE = ("--model revision", "text encoder weights")
PACKAGES = ("diffusers", "torch")  # their major.minor can change the latents (kernels, model code)


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
        "--model revision": (info.revision or "unresolved (the hub's commit could not be resolved)")
        if looks_like_hub_id(info.source) else None,
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
        # A shot that runs across a part boundary (every --clips-per-task clips' frames) is clipped as two.
        "--split-scenes": {"--scene-threshold": cfg.scene_threshold, "--min-shot-frames": cfg.min_shot_frames,
                           "--clips-per-task": cfg.clips_per_task} if cfg.split_scenes else None,
        "--tiling": cfg.tiling,  # tiles are blended at their seams: other values
        # Off (or as before): None, so that jobs recorded before these options existed keep their identity.
        "--slicing": True if cfg.slicing else None,  # each clip of a batch alone: other kernels, other bits
        "--memory-format": _memory_format(cfg),
        "--text-embeddings": _digest(info.text.identity()) if cfg.text_embeddings and info.text else None,
        "--caption-column": cfg.caption_field if cfg.text_embeddings and cfg.manifest else None,
        "text dtype": text_dtype(cfg) if cfg.text_embeddings else None,
        "text encoder weights": info.text.encoder_weights if cfg.text_embeddings and info.text else None,
        "--image-latents": True if cfg.image_latents else None,
        "--audio-latents": _digest(info.audio.identity()) if cfg.audio_latents and info.audio else None,
        "INPUT": _where(cfg.input),
        "--manifest": _where(cfg.manifest),
        "manifest columns": [list(c) for c in cfg.extra_columns] or None,
    }


def _memory_format(cfg: Config) -> str | None:
    """The layout the VAE runs in when it is not --memory-format auto's pick for the device; None
    when it is, so that a job recorded before this entry (most ran auto) keeps its identity.
    channels_last_3d and contiguous run other kernels, whose latents differ in their last bits
    (BENCHMARKS.md; on CPU the stored float16 latents of the tiny test VAE differ too)."""
    if cfg.memory_format == "auto":
        return None
    if cfg.device == "auto":
        return PENDING
    chosen = memory_format(cfg, cfg.device)
    return None if chosen == memory_format(cfg.replace(memory_format="auto"), cfg.device) else chosen


def versions() -> dict:
    """{package: version} of PACKAGES as installed where the driver runs (None: not installed)."""
    from pipeline.sink import installed_versions

    return installed_versions(PACKAGES)


def _minor(version: str | None) -> str | None:
    return ".".join(version.split("+")[0].split(".")[:2]) if version else None


def _version_changes(recorded: dict | None, current: dict) -> list[str]:
    """'package: old -> new' where major.minor differs; none for a record without versions."""
    if recorded is None:
        return []
    return [f"{name} {recorded.get(name)} -> {current[name]}" for name in PACKAGES
            if _minor(recorded.get(name)) != _minor(current[name])]


def fingerprint(ident: dict) -> str:
    return _digest({"version": VERSION, **ident})


def record(cfg: Config, info: ModelInfo, previous: dict | None = None) -> dict:
    """The identity as the run records it (the compute dtype resolved), with the versions it runs
    and, carried over from ``previous`` (the record this run honours), the version changes
    accepted over OUTPUT's life."""
    ident, now = identity(cfg, info), versions()
    # An honoured record keeps its fingerprint: entries added to the identity since it was made
    # (compared only where it has them) must not make its own files look like another job's.
    fp = previous["fingerprint"] if previous is not None and previous.get("fingerprint") else fingerprint(ident)
    rec = {"version": VERSION, "fingerprint": fp, "identity": ident, "versions": now}
    accepted = list((previous or {}).get("accepted version changes", []))
    if previous is not None and previous.get("versions") is None:
        accepted.append({"from": None, "to": now, "why": "recorded before versions were: the results "
                         "written before this run were made with versions no one can tell now"})
    elif previous is not None and _version_changes(previous["versions"], now):
        accepted.append({"from": previous["versions"], "to": now, "why": "--allow-version-change"})
    if accepted:
        rec["accepted version changes"] = accepted
    return rec


class JobMismatch(ConfigError):
    """OUTPUT belongs to a job with other settings."""


def _differences(recorded: dict, current: dict) -> list[str]:
    lines = []
    for key in [*current, *(k for k in recorded if k not in current)]:
        old, new = recorded.get(key), current.get(key)
        if (key in ("--dtype", "text dtype") and new is None) or new == PENDING:
            continue  # not given: compared once the device is known
        if key in NOT_KNOWN_BEFORE and key not in recorded:
            continue
        if old != new:
            lines.append(f"{key}: {_show(old)} -> {_show(new)}")
    return lines


def _show(value) -> str:
    return "(none)" if value is None else str(value)


def check(cfg: Config, info: ModelInfo) -> dict | None:
    """Compare with what OUTPUT recorded. Returns the record when it matches (to be honoured);
    None when there is none to honour (a new OUTPUT, --overwrite, or a record with no result
    written under it). Raises JobMismatch, whose message lists each differing setting and the
    ways forward."""
    if cfg.overwrite:
        return None
    recorded = layout.read_json(cfg.output, layout.JOB, cfg.s3)
    if recorded is None:
        if layout.has_results(cfg.output, cfg.s3):
            raise JobMismatch(f"OUTPUT {cfg.output} holds results but no {layout.JOB} (written by an "
                              "older version, or not by this tool): pass --overwrite to start afresh, "
                              "or choose another OUTPUT")
        return None
    lines = _differences(recorded.get("identity", {}), identity(cfg, info))
    if not cfg.allow_version_change:
        lines += [f"{change} (another major.minor: pass --allow-version-change to accept it)"
                  for change in _version_changes(recorded.get("versions"), versions())]
    if not lines:
        return recorded
    if not layout.has_results(cfg.output, cfg.s3):
        return None  # nothing was written under the old settings: the new ones replace them
    raise JobMismatch(
        f"OUTPUT {cfg.output} holds the results of a job with other settings:\n"
        + "\n".join(f"  {line}" for line in lines)
        + "\nPass --overwrite to delete them and start afresh, or choose another OUTPUT.")


def write(cfg: Config, info: ModelInfo, previous: dict | None = None) -> dict:
    """Record the job in OUTPUT (before anything else is written); returns the record.
    ``previous``: the record check() returned, which this run honours. A record of another job
    (``check`` returned None: nothing was written under it, or --overwrite) is replaced, and its
    bookkeeping with it: its markers list the clips of its own settings, never outcomes of this
    job."""
    rec = record(cfg, info, previous)
    old = None if previous is not None else layout.read_json(cfg.output, layout.JOB, cfg.s3)
    if old is not None and old.get("fingerprint") != rec["fingerprint"]:
        layout.delete(cfg.output, [layout.SUCCESS, layout.MARKERS_DIR, layout.ERRORS_DIR], cfg.s3)
    layout.write_json(cfg.output, layout.JOB, rec, cfg.s3)
    return rec
