"""``video-latents plan INPUT [encode options]``: what an ``encode`` with the same options would do,
read from the containers' headers: no model weights loaded, no GPU, nothing written.

Inputs, clips per video and per bucket, frames to decode, bytes of latents, the tasks long
videos are split into, the inputs that will fail (too short, over a limit, unreadable), and an
estimate of GPU-hours from a measured encode rate (``--clips-per-s``, or the GPU benchmark's
result in bench/results/ when there is one).
"""
from __future__ import annotations

import glob
import json
import math
import os
from collections import Counter, defaultdict

from pipeline import decode, probe, sources
from pipeline.config import Config, latent_bytes_per_row
from pipeline.model import ModelInfo

# Inputs probed per task: a header read is quick, and a task per input would cost more than it.
PROBES_PER_TASK = 64
EXAMPLES = 5  # inputs named per problem


def plan_row(row: dict, cfg: Config) -> dict:
    """Ray Data map step: one listed input's plan (or the error ``encode`` would record)."""
    out = {"source_uri": row["source_uri"], "clips": 0, "frames": 0, "bucket": None, "parts": 1, "problem": None,
           "shots": 0, "short_shots": 0, "clips_lost": 0, "shot_frames": [], "fps": None, "audio_rate": None}
    try:
        p = probe.probe(row, cfg)
    except Exception as e:  # noqa: BLE001 - recorded as encode would record it
        return {**out, "problem": f"{getattr(e, 'stage', 'decode')}/{_error_type(e)}"}
    frames = probe.frames_after_resampling(p, cfg)
    span = (row.get("start_sec"), row.get("end_sec"))
    if span != (None, None):  # a manifest's span: one clip, if it holds enough frames
        end = span[1] if span[1] is not None else p.start_time + frames / max(p.fps, 1e-9)
        frames = max(0, round((end - (span[0] or 0.0)) * (cfg.fps or p.fps)))
        clips = 1 if frames >= cfg.num_frames else 0
    else:
        clips = probe.clip_count(frames, cfg)
    if cfg.split_scenes and span == (None, None) and clips:
        try:
            shots = _shots(row, cfg)
        except Exception as e:  # noqa: BLE001 - recorded as encode would record it
            return {**out, "problem": f"{getattr(e, 'stage', 'decode')}/{_error_type(e)}"}
        within = sum(probe.clip_count(n, cfg) for n in shots)
        out.update(shots=len(shots), short_shots=sum(n < cfg.num_frames for n in shots), clips_lost=clips - within,
                   shot_frames=shots)
        clips = within
        if clips == 0:
            return {**out, "frames": frames}  # every shot shorter than a clip: no clip, and no error
    if clips == 0:
        return {**out, "frames": frames, "problem": "sample/TooShort"}
    height, width = decode.choose_bucket(p.width, p.height, cfg.buckets) if cfg.buckets else (cfg.height, cfg.width)
    if cfg.max_clips is not None and span == (None, None) and not cfg.split_scenes:
        frames = min(frames, (clips - 1) * cfg.stride + cfg.num_frames)  # decoding stops after the last clip
    splits = (cfg.clips_per_task and not cfg.fps and span == (None, None) and p.constant_rate
              and clips > cfg.clips_per_task)
    return {**out, "clips": clips, "frames": frames, "bucket": f"{height}x{width}",
            "parts": math.ceil(clips / cfg.clips_per_task) if splits else 1,
            "fps": cfg.fps or p.fps,  # the rate its clips are cut at: a clip's audio spans num_frames / fps
            "audio_rate": p.audio_rate}  # the rate that audio is cut at, then resampled


def _shots(row: dict, cfg: Config) -> list[int]:
    """--split-scenes: the input's shot lengths, found by decoding it (no header tells them)."""
    import contextlib

    import av

    from pipeline import storage

    source = storage.open_for_decode(row.get("path") or row["source_uri"], cfg.s3)
    with contextlib.closing(source) if hasattr(source, "close") else contextlib.nullcontext():
        with av.open(source, mode="r") as container:
            return decode.shot_lengths(container, cfg)


def _error_type(e: BaseException) -> str:
    cause = e.__cause__ if isinstance(e, decode.Unreadable) and e.__cause__ else e
    return type(cause).__name__


def plan(cfg: Config, info: ModelInfo, clips_per_s: float | None = None) -> dict:
    """Probe every input (on Ray: the local one, or the cluster's) and sum up."""
    import ray

    from pipeline import cluster

    cluster.connect_ray()
    rows = ray.data.read_datasource(sources.Listing(cfg).datasource()) \
        .repartition(target_num_rows_per_block=PROBES_PER_TASK) \
        .map(plan_row, fn_kwargs={"cfg": cfg})
    clips_per_video, buckets, problems = Counter(), defaultdict(lambda: {"videos": 0, "clips": 0}), Counter()
    clips_by_size = Counter()  # (bucket, fps, audio rate) -> clips: the bytes of a row follow all three
    examples = defaultdict(list)
    total = {"inputs": 0, "inputs_ok": 0, "clips": 0, "frames_to_decode": 0, "decode_tasks": 0, "inputs_split": 0}
    shots_per_video, shot_frames = Counter(), Counter()
    for r in rows.iter_rows():
        total["inputs"] += 1
        if cfg.split_scenes and not r["problem"]:
            for key in ("shots", "short_shots", "clips_lost"):
                total[key] = total.get(key, 0) + r[key]
            shots_per_video[r["shots"]] += 1
            shot_frames.update(r["shot_frames"])
        total["frames_to_decode"] += r["frames"] if r["clips"] else 0
        total["decode_tasks"] += r["parts"]  # an input that will fail still takes its task
        if r["problem"]:
            problems[r["problem"]] += 1
            if len(examples[r["problem"]]) < EXAMPLES:
                examples[r["problem"]].append(r["source_uri"])
            continue
        total["inputs_ok"] += 1
        total["clips"] += r["clips"]
        if not r["clips"]:  # --split-scenes: every shot shorter than a clip
            clips_per_video[0] += 1
            continue
        total["inputs_split"] += r["parts"] > 1
        clips_per_video[r["clips"]] += 1
        buckets[r["bucket"]]["videos"] += 1
        buckets[r["bucket"]]["clips"] += r["clips"]
        size = (r["bucket"], r["fps"], r["audio_rate"]) if cfg.audio_latents else (r["bucket"], None, None)
        clips_by_size[size] += r["clips"]
    per_clip = {size: _bytes_per_clip(cfg, info, *size) for size in clips_by_size}
    latent_bytes = sum(n * per_clip[size] for size, n in clips_by_size.items())
    rate, rate_source = (clips_per_s, "--clips-per-s") if clips_per_s else _measured_rate(cfg, info)
    return {**total, "clips_per_video": dict(sorted(clips_per_video.items())), "buckets": dict(buckets),
            "latent_bytes": latent_bytes, "rows_per_file": None,
            "bytes_per_clip": [min(per_clip.values()), max(per_clip.values())] if per_clip else None,
            "problems": dict(problems.most_common()),
            "problem_examples": dict(examples),
            **({"shots_per_video": dict(sorted(shots_per_video.items())),
                "shot_frames": dict(sorted(shot_frames.items()))} if cfg.split_scenes else {}),
            "gpu_hours": round(total["clips"] / rate / 3600, 3) if rate else None,
            "clips_per_s_per_gpu": rate, "rate_from": rate_source}


def _bytes_per_clip(cfg: Config, info: ModelInfo, bucket: str, fps: float | None, audio_rate: int | None) -> int:
    height, width = (int(v) for v in bucket.split("x"))
    return latent_bytes_per_row(cfg.replace(height=height, width=width, buckets=()), info, fps, audio_rate)


def _measured_rate(cfg: Config, info: ModelInfo, results: str | None = None) -> tuple[float | None, str]:
    """Clips/s per GPU from the newest GPU benchmark result (``bench.gpu``'s JSON in bench/results/):
    the pipeline's steady state there (else the isolated encode), scaled by the clip's size against
    the benchmark's (encode work grows with frames x height x width). A rough estimate: measured
    with the benchmark's model and dtype, which the message names."""
    results = results or os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench", "results")
    for path in sorted(glob.glob(os.path.join(results, "gpu-*.json")), reverse=True):
        with open(path) as f:
            result = json.load(f)
        if result.get("device_name") in (None, "cpu") or result.get("cpu_fallback"):
            continue
        steady, isolated = result.get("pipeline_steady_clips_per_s"), result.get("isolated_clips_per_s")
        shape = (result.get("workload") or {}).get("clip_shape")
        if (steady or isolated) and shape:
            scale = math.prod(shape) / (cfg.num_frames * cfg.height * cfg.width)
            what = "the pipeline's steady state" if steady else "the isolated encode"
            model = (result.get("workload") or {}).get("model", "its model")
            return (steady or isolated) * scale, (
                f"{os.path.basename(path)}: {what} on an {result['device_name']} with {model}, "
                f"{'x'.join(map(str, shape))} clips, scaled to this clip size")
    return None, "no GPU benchmark result in bench/results/: pass --clips-per-s for an estimate"


def plan_command(cfg: Config, info: ModelInfo, clips_per_s: float | None, as_json: bool) -> int:
    result = plan(cfg, info, clips_per_s)
    if as_json:
        print(json.dumps(result))
        return 0
    print(f"plan for {cfg.input or cfg.manifest}: {result['inputs']} inputs, {result['inputs_ok']} with clips")
    print(f"  clips          {result['clips']} ({cfg.num_frames} frames each), "
          f"{result['frames_to_decode']} frames to decode")
    print(f"  decode tasks   {result['decode_tasks']} ({result['inputs_split']} long inputs split into parts "
          f"of {cfg.clips_per_task} clips)")
    for bucket, b in sorted(result["buckets"].items()):
        print(f"  bucket {bucket:<9} {b['videos']} videos, {b['clips']} clips")
    print(f"  clips per video {result['clips_per_video']}")
    if cfg.split_scenes:
        print(f"  shots          {result.get('shots', 0)} ({result.get('short_shots', 0)} shorter than a clip); "
              f"{result.get('clips_lost', 0)} clips fewer than without --split-scenes")
        print(f"  shots per video {result['shots_per_video']}")
    low, high = result["bytes_per_clip"] or (None, None)
    per_clip = "" if low is None else f", {low if low == high else f'{low}-{high}'} bytes per clip"
    print(f"  latents        {result['latent_bytes'] / 2**30:.3f} GiB ({cfg.latent_dtype}){per_clip}")
    for problem, n in result["problems"].items():
        print(f"  will fail      {n:>6}  {problem}  e.g. {', '.join(result['problem_examples'][problem][:2])}")
    hours = f"{result['gpu_hours']} GPU-hours" if result["gpu_hours"] is not None else "GPU-hours unknown"
    print(f"  estimate       {hours} ({result['rate_from']})")
    return 0
