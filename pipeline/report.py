"""``python -m pipeline inspect OUTPUT``: what a run wrote, at a glance."""
from __future__ import annotations

import json
import math
from collections import Counter

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline import layout, storage
from pipeline.schema import ALL_TENSOR_COLUMNS, AUDIO_LATENTS, METADATA_KEY


def summarize(output: str, s3_endpoint: str | None = None) -> dict:
    endpoint = storage.default_endpoint(s3_endpoint)

    def dataset(folder):
        fs, path = storage.resolve(storage.join(output, folder), endpoint)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        return pads.dataset(path, filesystem=fs, format="parquet")

    out: dict = {"output": output}
    latents = dataset(layout.LATENTS_DIR)
    if latents is not None and latents.files:
        schema = latents.schema
        meta = json.loads(schema.metadata[METADATA_KEY]) if schema.metadata else {}
        tensors = {f.name: f.type for f in schema if f.name in ALL_TENSOR_COLUMNS}
        per_video = Counter(latents.to_table(columns=["source_uri"]).column("source_uri").to_pylist())
        videos_by_clips = Counter(per_video.values())
        out.update(clips=latents.count_rows(), files=len(latents.files), videos_with_clips=len(per_video),
                   clips_per_video=[[k, videos_by_clips[k]] for k in sorted(videos_by_clips)],
                   tensors={k: {"shape": list(t.shape), "dtype": str(t.value_type),
                                "layout": (meta.get(k) or {}).get("layout") if k == AUDIO_LATENTS else meta.get("layout")}
                            for k, t in tensors.items()},
                   bytes_per_clip=sum(math.prod(t.shape) * t.value_type.bit_width // 8 for t in tensors.values()),
                   model=meta.get("model"), vae_class=meta.get("vae_class"),
                   latent_mode=meta.get("latent_mode"), layout=meta.get("layout"),
                   scaling_factor=meta.get("scaling_factor"), versions=meta.get("versions"))
    else:
        out.update(clips=0, files=0)
    errors = dataset(layout.ERRORS_DIR)
    if errors is not None and errors.files:
        rows = errors.to_table(columns=["stage", "error_type", "error_class", "retryable"]).to_pylist()
        out["errors"] = len(rows)
        out["errors_by_type"] = dict(Counter(f"{r['stage']}/{r['error_type']}" for r in rows).most_common())
        out["errors_by_class"] = {
            cls: {"rows": sum(r["error_class"] == cls for r in rows),
                  "retryable": any(r["retryable"] for r in rows if r["error_class"] == cls),
                  "by_type": dict(Counter(f"{r['stage']}/{r['error_type']}" for r in rows
                                          if r["error_class"] == cls).most_common())}
            for cls in sorted({r["error_class"] for r in rows})}
    else:
        out["errors"], out["errors_by_type"], out["errors_by_class"] = 0, {}, {}
    job = layout.read_json(output, layout.JOB, endpoint)
    out["job_fingerprint"] = job.get("fingerprint") if job else None
    try:
        success = json.loads(storage.read_bytes(storage.join(output, layout.SUCCESS), endpoint))
        out["complete"] = True
        out.update({k: success.get(k) for k in ("videos", "wall_time_s", "clips_per_s")})
    except (FileNotFoundError, OSError):
        out["complete"] = False  # running, interrupted, retryable errors left, or not an OUTPUT of ours
    return out


def inspect_command(output: str, s3_endpoint: str | None, as_json: bool) -> int:
    summary = summarize(output, s3_endpoint)
    if as_json:
        print(json.dumps(summary))
        return 0
    state = "complete" if summary["complete"] else "no _SUCCESS: running, interrupted, or with retryable errors (rerun to finish)"
    print(f"{output}: {state}")
    print(f"  clips      {summary['clips']} in {summary['files']} files"
          + (f", from {summary.get('videos_with_clips')} of {summary.get('videos')} videos"
             if summary.get("videos") is not None else ""))
    for name, t in summary.get("tensors", {}).items():
        print(f"  {name:<10} {t['dtype']} {t['shape']} ({t.get('layout') or summary.get('layout')})")
    if summary.get("bytes_per_clip"):
        print(f"  per clip   {summary['bytes_per_clip']} bytes of tensors")
    if summary.get("vae_class"):
        print(f"  model      {summary['model']} ({summary['vae_class']}, {summary['latent_mode']}, "
              f"scaling_factor {summary['scaling_factor']})")
    print(f"  errors     {summary['errors']}")
    for cls, group in summary["errors_by_class"].items():
        what = "retryable: a rerun tries them again" if group["retryable"] else "final"
        print(f"    {group['rows']:>6}  {cls} ({what})")
        for kind, n in group["by_type"].items():
            print(f"      {n:>6}  {kind}")
    if summary.get("clips_per_s") is not None:
        print(f"  throughput {summary['clips_per_s']} clips/s over {summary['wall_time_s']} s")
    return 0


# --- report.html: written by each run next to _SUCCESS; plain HTML with inline SVG -------------

def _svg_line(points: list[tuple[float, float]], xlabel: str, ylabel: str, w=520, h=220) -> str:
    if len(points) < 2:
        return "<p>(not enough points)</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_max, y_max = max(xs) or 1, max(ys) or 1
    px = lambda x: 50 + (w - 70) * x / x_max  # noqa: E731
    py = lambda y: h - 30 - (h - 50) * y / y_max  # noqa: E731
    path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
    return (f'<svg width="{w}" height="{h}" role="img"><polyline fill="none" stroke="#2b6cb0" stroke-width="2" '
            f'points="{path}"/><line x1="50" y1="{h - 30}" x2="{w - 20}" y2="{h - 30}" stroke="#999"/>'
            f'<line x1="50" y1="20" x2="50" y2="{h - 30}" stroke="#999"/>'
            f'<text x="{w / 2}" y="{h - 5}" text-anchor="middle">{xlabel} (0 to {x_max:g})</text>'
            f'<text x="5" y="15">{ylabel} (max {y_max:g})</text></svg>')


def _svg_bars(items: list[tuple[str, int]], w=520, bar=22) -> str:
    if not items:
        return "<p>none</p>"
    top = max(v for _, v in items) or 1
    rows = []
    for i, (label, value) in enumerate(items):
        y = 5 + i * (bar + 6)
        rows.append(f'<rect x="200" y="{y}" width="{(w - 260) * value / top:.1f}" height="{bar}" fill="#2b6cb0"/>'
                    f'<text x="195" y="{y + bar - 6}" text-anchor="end">{_escape(label)}</text>'
                    f'<text x="{205 + (w - 260) * value / top:.1f}" y="{y + bar - 6}">{value}</text>')
    return f'<svg width="{w}" height="{10 + len(items) * (bar + 6)}" role="img">{"".join(rows)}</svg>'


def _escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def binned_rate(timeline: list[tuple[float, int]], bins: int = 20) -> list[tuple[float, float]]:
    """Clips/s over equal time bins (write results come in bursts; per-result rates are noise)."""
    if len(timeline) < 2 or timeline[-1][0] <= 0:
        return []
    width = timeline[-1][0] / bins

    def written_by(t):
        return max((c for s, c in timeline if s <= t + 1e-9), default=0)

    return [(round((b + 1) * width, 3), (written_by((b + 1) * width) - written_by(b * width)) / width)
            for b in range(bins)]


def shot_histogram(shot_frames: list[int], num_frames: int) -> list[tuple[str, int]]:
    """Shots by length in frames, in doubling bins (1, 2-3, 4-7, ...); a bin of shots too short
    for one clip says so."""
    bins: Counter = Counter(max(0, int(n)).bit_length() for n in shot_frames if n)
    out = []
    for b in sorted(bins):
        lo, hi = 1 << (b - 1), (1 << b) - 1
        label = f"{lo}-{hi} frames" if hi > lo else f"{lo} frame{'s' if lo > 1 else ''}"
        out.append((label + (" (no clip)" if hi < num_frames else ""), bins[b]))
    return out


def _shots_section(cfg) -> str:
    if not getattr(cfg, "split_scenes", False):
        return ""
    table = layout.read_columns(cfg.output, layout.MARKERS_DIR, ["shot_frames"], cfg.s3, cfg.job_fingerprint)
    lengths = [n for cell in (table.column("shot_frames").to_pylist() if table is not None else []) for n in cell or []]
    return (f"<h2>Shot lengths</h2><p>{len(lengths)} shots (--split-scenes; a shot across a part boundary counts "
            f"as two)</p>{_svg_bars(shot_histogram(lengths, cfg.num_frames))}")


def write_html(cfg, summary: dict, timeline: list[tuple[float, int]]) -> str:
    """OUTPUT/report.html: throughput over time, errors by type, clips per video."""
    info = summarize(cfg.output, cfg.s3)
    rates = binned_rate(timeline)
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>video-latents report</title>
<style>body{{font-family:sans-serif;max-width:760px;margin:2em auto}} td{{padding:2px 12px}}</style></head><body>
<h1>video-latents run</h1>
<table>{''.join(f'<tr><td>{_escape(k)}</td><td>{_escape(v)}</td></tr>' for k, v in summary.items())}
<tr><td>model</td><td>{_escape(cfg.model)} ({_escape(info.get('vae_class'))})</td></tr></table>
<h2>Clips written over time</h2>{_svg_line(timeline, "seconds", "clips")}
<h2>Throughput</h2>{_svg_line(rates, "seconds", "clips/s")}
<h2>Errors by type</h2>{_svg_bars(list(info['errors_by_type'].items()))}
<h2>Clips per video</h2>{_svg_bars([(f"{k} clip{'s' if k > 1 else ''}", n) for k, n in info.get('clips_per_video', [])])}
{_shots_section(cfg)}
</body></html>"""
    uri = storage.join(cfg.output, layout.REPORT)
    storage.write_bytes_atomic(uri, body.encode(), cfg.s3)
    return uri
