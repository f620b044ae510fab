"""Shot boundaries found on the frames the decode step decodes (``--split-scenes``).

The score is PySceneDetect's ContentDetector's (BSD-3-Clause), reproduced in numpy so that no
OpenCV is needed: the mean absolute difference between consecutive frames of hue, saturation and
value, averaged with weights 1, 1, 1 (scenedetect/detectors/content_detector.py at commit
131c5f60: ``_mean_pixel_distance`` lines 29-36, the HSV split line 155, the components lines
166-169, the weighted average lines 177-180, the default threshold 27 line 106). The HSV values
are OpenCV's 8-bit ones (``cv2.COLOR_BGR2HSV``, H in 0..179): ``RGB2HSV_b`` in OpenCV's
modules/imgproc/src/color_hsv.cpp, fixed point with 12 fractional bits (see ``hsv``).

Frames are scored downscaled to DETECT_WIDTH pixels wide (PySceneDetect's own default works at
256: scene_manager.py ``DEFAULT_MIN_WIDTH``), so detection costs little next to decoding.

A cut is a frame whose score reaches the threshold, with no other such frame in the
``min_shot - 1`` frames before it (so shots between cuts are at least ``min_shot`` frames
long, and a flash or a fast burst gives one cut, at its first frame). The rule looks back a
bounded number of frames, so a part of a long video that starts ``lookback`` frames before its
first frame finds exactly the cuts the whole decode finds there.

Hard cuts are found at their frame. Gradual transitions (fades, dissolves, wipes) change each
frame by less than the threshold and are not cut: a clip can span them. A fast fade (a few
frames) or a flash can score above the threshold and be cut.
"""
from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 27.0  # PySceneDetect's ContentDetector default; measured in bench/scenes.py
DEFAULT_MIN_SHOT = 15  # frames; PySceneDetect's min_scene_len default
DETECT_WIDTH = 256

_HSV_SHIFT = 12
# OpenCV's tables: sdiv_table[i] = saturate_cast<int>((255 << hsv_shift)/(1.*i)),
# hdiv_table180[i] = saturate_cast<int>((180 << hsv_shift)/(6.*i)); [0] = 0. saturate_cast<int>
# of a double rounds half to even (cvRound); no entry is an exact half.
_I = np.arange(1, 256, dtype=np.float64)
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / _I)]).astype(np.int64)
_HDIV = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6.0 * _I))]).astype(np.int64)


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] RGB -> (hue 0..179, saturation, value) as OpenCV's 8-bit BGR2HSV gives them."""
    r, g, b = (rgb[..., c].astype(np.int32) for c in range(3))
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    s = (diff * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    # h = (vr & (g - b)) + (~vr & ((vg & (b - r + 2 * diff)) + ((~vg) & (r - g + 4 * diff))))
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return h.astype(np.uint8), s.astype(np.uint8), v.astype(np.uint8)


def _mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).sum()) / a.size


def content_score(previous: tuple, current: tuple) -> float:
    """ContentDetector's frame score with its default weights (1, 1, 1, edges 0)."""
    return sum(_mean_distance(p, c) for p, c in zip(previous, current)) / 3.0


class Downscaler:
    """Decoded frames -> small uint8 RGB for scoring, one swscale context kept per video."""

    def __init__(self, width: int = DETECT_WIDTH):
        from av.video.reformatter import VideoReformatter

        self.width, self.reformatter = width, VideoReformatter()

    def __call__(self, frame) -> np.ndarray:
        w = min(self.width, frame.width)
        h = max(2, round(frame.height * w / frame.width / 2) * 2)
        return self.reformatter.reformat(frame, width=w, height=h, format="rgb24",
                                         interpolation="AREA").to_ndarray()


class ShotDetector:
    """Fed each frame in order; says whether the frame starts a new shot (a cut)."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, min_shot: int = DEFAULT_MIN_SHOT,
                 width: int = DETECT_WIDTH):
        self.threshold, self.min_shot = threshold, max(1, min_shot)
        self.downscale = Downscaler(width)
        self.previous: tuple | None = None
        self.since_above = None  # frames since the last frame at or above the threshold
        self.scores: list[float] = []  # kept only when asked (measurements, tests)
        self.keep_scores = False

    @property
    def lookback(self) -> int:
        """Frames before a frame that decide whether it is a cut."""
        return self.min_shot

    def feed(self, frame) -> bool:
        return self.feed_rgb(self.downscale(frame))

    def feed_rgb(self, rgb: np.ndarray) -> bool:
        current, first = hsv(rgb), self.previous is None
        score = 0.0 if first else content_score(self.previous, current)
        self.previous = current
        if self.keep_scores:
            self.scores.append(score)
        above = not first and score >= self.threshold
        cut = above and (self.since_above is None or self.since_above >= self.min_shot - 1)
        self.since_above = 0 if above else (None if self.since_above is None else self.since_above + 1)
        return cut
