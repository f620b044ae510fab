"""A sanity check on what was stored: per-channel mean and standard deviation of the latents a
run wrote, against what the family's normalisation should give.

A wrong scaling factor, a missing latents_mean/std or a dtype overflow shows as channels far from
the expected statistics; it is otherwise silent, since every value is finite and every shape is
right. The encoder actors accumulate moments of the stored values (after the cast to the storage
dtype) batch by batch; the run's ledger merges them; the summary, ``_SUCCESS`` and report.html
carry the result, with a warning on stderr when it is off.
"""
from __future__ import annotations

import numpy as np

# How far from the expected statistics a channel may be before the run warns. Real latents of a
# correctly normalised family sit well inside these; a wrong scaling factor (say 1.0 for 0.7) or
# a forgotten mean/std lands outside.
MEAN_TOLERANCE = 0.5
STD_RANGE = (0.5, 2.0)
# Families with a scaling factor only (CogVideoX, HunyuanVideo) are scaled to about unit
# variance overall, not per channel: the check is on the overall standard deviation.
OVERALL_STD_RANGE = (0.25, 4.0)


def moments(latents: np.ndarray) -> dict:
    """Per-channel count, sum and sum of squares of [B, T, C, h, w] latents, in float64."""
    x = np.moveaxis(np.asarray(latents, dtype=np.float64), 2, 0).reshape(latents.shape[2], -1)
    finite = np.isfinite(x)
    x = np.where(finite, x, 0.0)
    return {"n": finite.sum(axis=1).tolist(), "sum": x.sum(axis=1).tolist(),
            "sumsq": np.square(x).sum(axis=1).tolist(), "nonfinite": int((~finite).sum())}


def merge(total: dict | None, part: dict) -> dict:
    if not total:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in part.items()}
    return {"n": [a + b for a, b in zip(total["n"], part["n"])],
            "sum": [a + b for a, b in zip(total["sum"], part["sum"])],
            "sumsq": [a + b for a, b in zip(total["sumsq"], part["sumsq"])],
            "nonfinite": total["nonfinite"] + part["nonfinite"]}


def check(total: dict | None, has_statistics: bool, latent_mode: str, nonfinite_clips: int = 0) -> dict:
    """The summary's ``latent_check``: per-channel mean and std of this run's stored latents, what
    they should be, and warnings."""
    if latent_mode == "dist":
        return {"checked": False, "why": "dist mode stores the raw posterior moments, not normalised latents"}
    if not total or not sum(total["n"]):
        return {"checked": False, "why": "no clip encoded by this run"}
    n = np.maximum(np.asarray(total["n"], dtype=np.float64), 1)
    mean = np.asarray(total["sum"]) / n
    std = np.sqrt(np.maximum(np.asarray(total["sumsq"]) / n - mean ** 2, 0.0))
    overall_mean = float(np.sum(total["sum"]) / n.sum())
    overall_std = float(np.sqrt(max(np.sum(total["sumsq"]) / n.sum() - overall_mean ** 2, 0.0)))
    warnings = []
    if has_statistics:
        expected = "per channel: mean about 0, std about 1 (the family's latents_mean/latents_std)"
        off = [c for c in range(len(mean)) if abs(mean[c]) > MEAN_TOLERANCE or not STD_RANGE[0] <= std[c] <= STD_RANGE[1]]
        if off:
            warnings.append(f"{len(off)} of {len(mean)} channel(s) are far from mean 0, std 1 (first: channel "
                            f"{off[0]}, mean {mean[off[0]]:.3g}, std {std[off[0]]:.3g}): a wrong latents_mean/std, "
                            "scaling factor or dtype?")
    else:
        expected = "overall std about 1 (the family's scaling_factor)"
        if not OVERALL_STD_RANGE[0] <= overall_std <= OVERALL_STD_RANGE[1]:
            warnings.append(f"the overall std is {overall_std:.3g}, far from 1: a wrong scaling factor or dtype?")
    if total["nonfinite"] or nonfinite_clips:
        warnings.append(f"{total['nonfinite']} non-finite stored value(s); {nonfinite_clips} clip(s) with NaN or "
                        "infinite latents were not stored (error rows)")
    return {"checked": True, "expected": expected, "mean": [round(float(v), 4) for v in mean],
            "std": [round(float(v), 4) for v in std], "overall_mean": round(overall_mean, 4),
            "overall_std": round(overall_std, 4), "nonfinite_values": total["nonfinite"],
            "nonfinite_clips": nonfinite_clips, "warnings": warnings}
