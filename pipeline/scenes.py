"""Shot boundaries found on the frames the decode step decodes (``--split-scenes``).

The score is PySceneDetect's ContentDetector's (BSD-3-Clause), reproduced in numpy so that no
OpenCV is needed: the mean absolute difference between consecutive frames of hue, saturation and
value, averaged with weights 1, 1, 1 (scenedetect/detectors/content_detector.py at commit
131c5f60: ``_mean_pixel_distance`` lines 29-36, the HSV split line 155, the components lines
166-169, the weighted average lines 177-180). The HSV values
are OpenCV's 8-bit ones (``cv2.COLOR_BGR2HSV``, H in 0..179): ``RGB2HSV_b`` in OpenCV's
modules/imgproc/src/color_hsv.cpp, fixed point with 12 fractional bits (``hsv_formula``; the
detector looks them up in tables built from it, ``planes``: equal to OpenCV 5.1 on all 2^24
colours).

Frames are scored on the pictures the clips are made of (resized to --height x --width, so a
part and the whole decode score the same pixels, and no second scaling is paid), sampled every
k-th pixel to about DETECT_WIDTH wide: PySceneDetect scores at 256 wide (scene_manager.py
``DEFAULT_MIN_WIDTH``); on bench/scenes.py's cuts, pans and fades, scores moved by 2 at most
between 256 wide (area averaging) and 64 (nearest pixel). Detection costs about 0.035 ms a
frame on 128x192 pictures (0.07 ms before the tables: numpy's per-call overhead, not arithmetic,
is most of it at this size).
The decision is AdaptiveDetector's (see ``ShotDetector``).

Hard cuts are found at their frame. A dissolve or a slow fade changes each frame little and is
not cut: a clip can span it. A fade to black is cut where the picture turns black (hue and
saturation collapse there): the black frames start a shot, too short for a clip unless the black
lasts. A camera pan raises the scores of its neighbours as much as its own and is not cut.
"""
from __future__ import annotations

import functools
from collections import deque
from typing import Iterator

import numpy as np

DEFAULT_THRESHOLD = 2.4  # AdaptiveDetector has 3.0; margins measured in bench/scenes.py and on tests/data
DEFAULT_MIN_SHOT = 15  # frames; PySceneDetect's min_scene_len default
MIN_CONTENT_SCORE = 15.0  # AdaptiveDetector's min_content_val
WINDOW = 2  # AdaptiveDetector's window_width
DETECT_WIDTH = 64

_HSV_SHIFT = 12
# OpenCV's tables: sdiv_table[i] = saturate_cast<int>((255 << hsv_shift)/(1.*i)),
# hdiv_table180[i] = saturate_cast<int>((180 << hsv_shift)/(6.*i)); [0] = 0. saturate_cast<int>
# of a double rounds half to even (cvRound); no entry is an exact half.
_I = np.arange(1, 256, dtype=np.float64)
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / _I)]).astype(np.int64)
_HDIV = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6.0 * _I))]).astype(np.int64)


def hsv_formula(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [..., 3] RGB -> (hue 0..179, saturation, value) by OpenCV's fixed-point formula, per
    pixel: the reference that ``planes``' tables are built from."""
    r, g, b = (rgb[..., c].astype(np.int32) for c in range(3))
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    s = (diff * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    # h = (vr & (g - b)) + (~vr & ((vg & (b - r + 2 * diff)) + ((~vg) & (r - g + 4 * diff))))
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return h.astype(np.uint8), s.astype(np.uint8), v.astype(np.uint8)


_SPAN = 511  # r - g and g - b each lie in -255..255


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """Hue and saturation looked up, not computed: a frame's ~20 numpy calls on a few thousand
    pixels cost more in call overhead than in arithmetic. Hue depends only on (r - g, g - b)
    (which channel is largest, the spread and the numerator are all differences): it is at
    (r - g) * 511 + (g - b), a negative index counting from the end. Saturation depends on
    (v, min): at v * 256 + min."""
    rg, gb = (x.ravel() for x in np.meshgrid(np.arange(-255, 256), np.arange(-255, 256), indexing="ij"))
    b = -np.minimum(np.minimum(0, gb), gb + rg)  # the darkest colour with these differences
    rgb = np.stack([b + gb + rg, b + gb, b], axis=-1)
    real = rgb.max(axis=-1) <= 255  # a spread over 255 is no colour: never looked up
    hue = np.zeros(_SPAN * _SPAN, np.uint8)
    hue[(rg * _SPAN + gb)[real]] = hsv_formula(rgb[real].astype(np.uint8))[0]
    v, low = (x.ravel() for x in np.meshgrid(np.arange(256), np.arange(256), indexing="ij"))
    sat = np.where(low <= v, ((v - low) * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT, 0).astype(np.uint8)
    return hue, sat


def planes(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> int16 [3, H, W]: hue (0..179), saturation and value as OpenCV's
    8-bit BGR2HSV gives them (``hsv_formula``), in one array so that a frame's score is one
    subtraction."""
    hue, sat = _tables()
    r, g, b = (rgb[..., c].astype(np.int32) for c in range(3))  # contiguous: numpy is slow on strided
    v = np.maximum(np.maximum(r, g), b)
    low = np.minimum(np.minimum(r, g), b)
    out = np.empty((3, *v.shape), np.int16)
    out[0] = hue.take((r - g) * _SPAN + (g - b))
    v_low = v << 8
    v_low += low
    out[1] = sat.take(v_low)
    out[2] = v
    return out


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] RGB -> (hue 0..179, saturation, value) as OpenCV's 8-bit BGR2HSV gives them."""
    h, s, v = planes(rgb).astype(np.uint8)
    return h, s, v


def content_score(previous: np.ndarray, current: np.ndarray) -> float:
    """ContentDetector's frame score with its default weights (1, 1, 1, edges 0), on two frames'
    ``planes``: the mean absolute difference of each channel, averaged."""
    n = current[0].size
    dh, ds, dv = np.abs(current - previous).reshape(3, -1).sum(axis=1).tolist()
    return (dh / n + ds / n + dv / n) / 3.0


def small(rgb: np.ndarray, width: int = DETECT_WIDTH) -> np.ndarray:
    """Every k-th pixel of every k-th row: about ``width`` pixels wide (a view, no copy)."""
    step = max(1, rgb.shape[1] // width)
    return rgb[::step, ::step]


class ShotDetector:
    """PySceneDetect's AdaptiveDetector (scenedetect/detectors/adaptive_detector.py at 131c5f60:
    defaults lines 39-42, the window of 2w+1 scores line 111, its mean without the centre lines
    117-119, the ratio lines 122-128, the test lines 136-138): a frame's content score against
    the mean of the ``window`` frames' scores on each side of it.
    A frame meets the threshold when that ratio reaches ``ratio`` (adaptive_threshold, 3.0
    there, 2.4 here: a real cut, tests/data/bikes.mp4's frame 76, scores 2.99-3.35 across clip
    sizes, and no frame within a shot there or in the generated pans and fades reaches 1.9) and its
    score reaches ``min_score`` (min_content_val, 15): a camera pan or fast motion raises its
    neighbours' scores too, a cut only its own. The first ``window`` frames, and the
    last, are never cuts (their window is not whole), as there.

    A cut is a frame that meets the threshold with no other such frame in the ``min_shot - 1``
    frames before it (PySceneDetect suppresses a cut within min_scene_len of the last *cut*, a
    chain that reaches back without bound; this rule looks back a bounded number of frames, so a
    part of a long video that starts ``lookback`` frames before its first frame decides exactly
    as the whole decode does)."""

    def __init__(self, ratio: float = DEFAULT_THRESHOLD, min_shot: int = DEFAULT_MIN_SHOT,
                 min_score: float = MIN_CONTENT_SCORE, window: int = WINDOW, width: int = DETECT_WIDTH):
        self.ratio, self.min_shot, self.min_score, self.window = ratio, max(1, min_shot), min_score, window
        self.width = width
        self.scores: list[float] | None = None  # every score, when a caller sets it to [] (measurements)

    @property
    def lookback(self) -> int:
        """Frames before a frame that its decision depends on (their scores' windows included)."""
        return self.min_shot + self.window + 1

    @property
    def lookahead(self) -> int:
        """Frames after a frame that its decision waits for."""
        return self.window

    def shots(self, indexed_frames, picture=lambda frame: frame) -> Iterator[tuple[int, object, bool]]:
        """(index, frame, starts a shot) for each (index, frame), ``lookahead`` frames late;
        ``picture(frame)`` is its uint8 [H, W, 3] RGB picture (by default the frame itself)."""
        w = self.window
        win: deque = deque(maxlen=2 * w + 1)  # (index, frame, score)
        previous, since_met, fed = None, None, 0
        for i, frame in indexed_frames:
            current = planes(small(picture(frame), self.width))
            score = 0.0 if previous is None else content_score(previous, current)
            previous, fed = current, fed + 1
            if self.scores is not None:
                self.scores.append(score)
            win.append((i, frame, score))
            if fed <= w:
                continue
            if fed < 2 * w + 1:  # the first frames: their window is not whole
                j, f, _ = win[fed - 1 - w]
                since_met = None if since_met is None else since_met + 1
                yield j, f, False
                continue
            j, f, target = win[w]
            met = self._meets(target, [s for k, (_, _, s) in enumerate(win) if k != w])
            cut = met and (since_met is None or since_met >= self.min_shot - 1)
            since_met = 0 if met else (None if since_met is None else since_met + 1)
            yield j, f, cut
        for j, f, _ in list(win)[max(0, len(win) - min(w, fed)):]:  # the last frames
            yield j, f, False

    def _meets(self, target: float, others: list[float]) -> bool:
        average = sum(others) / len(others)
        if abs(average) >= 0.00001:
            ratio = min(target / average, 255.0)
        else:
            ratio = 255.0 if target >= self.min_score else 0.0
        return ratio >= self.ratio and target >= self.min_score
