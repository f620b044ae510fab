"""--split-scenes: decode time with shot detection against without, and the content scores the
defaults (--scene-threshold 2.4, --min-shot-frames 15) were chosen from (with the real footage in
tests/data: tests/test_scenes.py). Never run as a test.

  python -m bench.scenes [--frames 240] [--sizes 1080x1920,720x1280,360x640]   (or python -m bench ... --scenes)

Decode: ``decode.iter_clips`` as the decode task runs it (FFmpeg on one thread, as one
--decode-cpus), best of 5, on a generated video of 4 shots (noisy moving gradients); clips/s per CPU and the ratio.
Scores: on generated hard cuts, a camera pan (2 and 8 px a frame at 1280 wide) and a fade to
black over 12 and 4 frames, the lowest score at a cut and the highest elsewhere.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from pipeline import decode, samples, scenes
from pipeline.config import Config


def _timed_decode(path: str, cfg: Config, reps: int = 5) -> tuple[float, int]:
    import av

    best, clips = float("inf"), 0
    for _ in range(reps):
        start = time.perf_counter()
        with av.open(path) as c:
            c.streams.video[0].thread_type = "SLICE"
            clips = sum(1 for _ in decode.iter_clips(c, path, cfg))
        best = min(best, time.perf_counter() - start)
    return best, clips


def decode_cost(frames: int, height: int, width: int, clip=(17, 128, 192)) -> dict:
    root = tempfile.mkdtemp(prefix="vl-scenes-")
    # 4 shots of moving gradients with noise (as the pipeline's benchmark videos: real decode work),
    # each in its own tint: without one, two such shots look alike to the detector (a score of 49
    # at the cut against about 20 within each: a ratio under 3)
    tints = np.array([[1, .6, .6], [.6, 1, .6], [.6, .6, 1], [1, 1, .5]], dtype=np.float32)
    shots = np.concatenate([(samples.synthetic_frames(frames // 4, height, width, seed) * tints[seed]).astype(np.uint8)
                            for seed in range(4)])
    path = samples.write_video(os.path.join(root, "shots.mp4"), shots)
    cfg = Config(input=root, output=root, model="m", num_frames=clip[0], height=clip[1], width=clip[2])
    import pipeline.decode as d

    threads = d.decode_threads
    d.decode_threads = lambda: 1  # one FFmpeg thread: clips/s per CPU
    try:
        plain, n_plain = _timed_decode(path, cfg)
        shots, n_shots = _timed_decode(path, cfg.replace(split_scenes=True))
        import av

        with av.open(path) as c:
            found = len(decode.shot_lengths(c, cfg.replace(split_scenes=True)))
    finally:
        d.decode_threads = threads
        shutil.rmtree(root)
    return {"source": f"{width}x{height}", "frames": frames, "clip": "x".join(map(str, clip)), "shots_found": found,
            "clips": n_plain, "split_scenes_clips": n_shots,
            "decode_clips_per_s_per_cpu": round(n_plain / plain, 2), "decode_frames_per_s": round(frames / plain, 1),
            "split_scenes_clips_per_s_per_cpu": round(n_shots / shots, 2),
            "split_scenes_frames_per_s": round(frames / shots, 1),
            "split_scenes_extra_decode_time": round(shots / plain - 1, 4)}


def rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def _scores(frames: np.ndarray) -> list[float]:
    import av

    root = tempfile.mkdtemp(prefix="vl-scores-")
    path = samples.write_video(os.path.join(root, "v.mp4"), frames)
    detector = scenes.ShotDetector()
    detector.scores = []
    with av.open(path) as c:
        for _ in detector.shots(enumerate(c.decode(video=0)), picture=rgb):
            pass
    shutil.rmtree(root)
    return detector.scores


def _ratios(scores: list[float], w: int = scenes.WINDOW) -> list[float]:
    """AdaptiveDetector's ratio of each frame whose window is whole (0 elsewhere)."""
    out = [0.0] * len(scores)
    for i in range(w, len(scores) - w):
        others = scores[i - w:i] + scores[i + 1:i + w + 1]
        mean = sum(others) / len(others)
        out[i] = min(scores[i] / mean, 255.0) if mean >= 1e-5 else 255.0
    return out


def threshold_margins(height: int = 360, width: int = 640) -> dict:
    """Content scores and adaptive ratios: the lowest at hard cuts, the highest in pans and fades."""
    shots = samples.shot_frames([24] * 6, height, width, 2)
    s = _scores(shots)
    r = _ratios(s)
    cuts = [i for i in range(24, len(s), 24)]
    out = {"hard_cut_min_score": round(min(s[i] for i in cuts), 1),
           "hard_cut_min_ratio": round(min(r[i] for i in cuts), 1),
           "within_shot_max_score": round(max(x for i, x in enumerate(s) if i not in cuts), 1)}
    for step in (2, 8):
        pan = _scores(samples.pan_frames(48, height, width, step))
        out[f"pan_{step}px_max_score"] = round(max(pan[1:]), 1)
        out[f"pan_{step}px_max_ratio"] = round(max(_ratios(pan[1:])), 2)
    for n in (12, 4):
        black = np.zeros((12, height, width, 3), np.uint8)
        s = _scores(np.concatenate([shots[:24], samples.fade(shots[23], black[0], n), black]))
        r = _ratios(s)
        inside = range(24, 24 + n)  # the fade's frames; 24 + n is the first black one
        out[f"fade_{n}_frames_max_score"] = round(max(s[i] for i in inside), 1)
        out[f"fade_{n}_frames_max_ratio"] = round(max(r[i] for i in inside), 2)
        out[f"fade_{n}_first_black_ratio"] = round(r[24 + n], 1)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.scenes", description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=240)
    p.add_argument("--sizes", default="1080x1920,720x1280,360x640", help="source sizes, HxW,...")
    args = p.parse_args(argv)
    result = {"decode": [decode_cost(args.frames, *(int(v) for v in size.split("x")))
                         for size in args.sizes.split(",")], **threshold_margins()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
