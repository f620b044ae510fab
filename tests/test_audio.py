"""LTX-2's audio latents (--audio-latents) against the LTX-2 trainer's and pipeline's audio path, on
a tone written into the test video with PyAV, with tiny random-weight diffusers models."""
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import wave
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import diffusers
from actors.encoder import VAEEncoder
from pipeline import decode, samples
from pipeline.audio import inspect_audio
from pipeline.config import Config, validate
from pipeline.schema import AUDIO_LATENTS

RATE, HOP, MELS, FPS, FRAMES, SIZE = 16000, 160, 16, 24, 9, 64
TONE_HZ = 437.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny LTX2Vocoder: mel frames (RATE / HOP a second) upsampled 4 x 4, so its output rate is 1600 Hz.
VOCODER = dict(in_channels=2 * MELS, hidden_channels=16, out_channels=2, upsample_kernel_sizes=[8, 8],
               upsample_factors=[4, 4], resnet_kernel_sizes=[3], resnet_dilations=[[1]],
               output_sampling_rate=RATE // HOP * 16)


def _model(folder: str, vocoder: bool = False) -> str:
    torch.manual_seed(0)
    video = diffusers.AutoencoderKLLTX2Video(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 16, 32),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1), patch_size=2)
    video.save_pretrained(os.path.join(folder, "vae"))
    # The statistics are per packed feature, channels x latent mel bins (2 x 4 = base_channels).
    audio = diffusers.AutoencoderKLLTX2Audio(base_channels=8, ch_mult=(1, 2, 4), num_res_blocks=1, latent_channels=2,
                                             mel_bins=MELS, sample_rate=RATE, mel_hop_length=HOP)
    audio.latents_mean.copy_(torch.linspace(-0.2, 0.3, 8))
    audio.latents_std.copy_(torch.linspace(0.6, 1.5, 8))
    audio.save_pretrained(os.path.join(folder, "audio_vae"))
    if vocoder:  # LTX2Pipeline's vocoder component, in vocoder/ as a diffusers LTX-2 repository lays it out
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

        LTX2Vocoder(**VOCODER).save_pretrained(os.path.join(folder, "vocoder"))
    return folder


def _rising_tone(seconds: float, rate: int = RATE) -> np.ndarray:
    """A tone growing louder: each clip's span sounds different."""
    t = np.arange(int(seconds * rate) + 400 * rate // RATE) / rate
    return ((0.1 + 0.4 * t / seconds) * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)


def _video_with_tone(path: str, frames: int, tone: np.ndarray | None, fps: int = FPS, rate: int = RATE) -> str:
    """An MKV: H.264 frames at ``fps`` and, when given, the mono tone as float PCM (lossless) at ``rate``."""
    import av

    pixels = samples.synthetic_frames(frames, SIZE, SIZE)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        sound = None
        if tone is not None:
            sound = container.add_stream("pcm_f32le", rate=rate)
            sound.layout = "mono"
        for image in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            for start in range(0, tone.shape[0], 1024):
                frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="flt", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path


def _slaney_fbank(n_freqs: int, rate: int, n_mels: int) -> np.ndarray:
    """torchaudio.functional.melscale_fbanks(..., norm="slaney", mel_scale="slaney"), in numpy
    (pytorch/audio src/torchaudio/functional/functional.py: _hz_to_mel, _mel_to_hz,
    _create_triangular_filterbank, melscale_fbanks)."""
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp

    def to_mel(f):
        return f / f_sp if f < min_log_hz else min_log_mel + math.log(f / min_log_hz) / logstep

    mels = np.linspace(to_mel(0.0), to_mel(rate / 2.0), n_mels + 2, dtype=np.float32).astype(np.float64)
    hz = np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)
    freqs = np.linspace(0, rate // 2, n_freqs)
    slopes = hz[None, :] - freqs[:, None]
    diff = np.diff(hz)
    fb = np.maximum(0.0, np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]))
    return fb * (2.0 / (hz[2:n_mels + 2] - hz[:n_mels]))[None, :]


def _trainer_mel(pcm: np.ndarray) -> np.ndarray:
    """[2, n] -> [1, 2, T, mel]: the trainer's AudioProcessor.waveform_to_mel (Lightricks/LTX-2 @400fd31,
    packages/ltx-core/src/ltx_core/model/audio_vae/ops.py:20-55; n_fft 1024 from
    model_configurator.py:158), as a numpy STFT: centred, reflect-padded, periodic Hann, power 1."""
    n_fft = 1024
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    padded = np.pad(pcm.astype(np.float64), ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    frames = pcm.shape[1] // HOP + 1
    idx = np.arange(n_fft)[None, :] + HOP * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(padded[:, idx] * window, axis=-1))  # [2, T, freqs]
    mel = spec @ _slaney_fbank(n_fft // 2 + 1, RATE, MELS)
    return np.log(np.maximum(mel, 1e-5))[None].astype(np.float32)


def _reference(model: str, pcm: np.ndarray, rate: int = RATE) -> np.ndarray:
    """The trainer's audio path on mono ``pcm`` at ``rate`` Hz, already cut and padded at that
    rate (process_videos.py:866-905: mono doubled at the native rate; then AudioProcessor.
    waveform_to_mel, ops.py:36-55: torchaudio.functional.resample to RATE, here pipeline.audio's
    port, checked against torchaudio's own output by test_resample_equals_torchaudios_own_output;
    the mel; encode) and LTX2Pipeline's normalisation (diffusers 0.42.1 pipeline_ltx2.py:706-710,
    on latents packed and unpacked by its own _pack/_unpack_audio_latents): [C, L, M]."""
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

    from pipeline.audio import resample

    stereo = resample(torch.from_numpy(np.repeat(pcm, 2, axis=0)), rate, RATE).numpy()
    vae = diffusers.AutoencoderKLLTX2Audio.from_pretrained(model, subfolder="audio_vae").eval()
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(_trainer_mel(stereo))).latent_dist.mode()
    packed = LTX2Pipeline._normalize_audio_latents(LTX2Pipeline._pack_audio_latents(z), vae.latents_mean,
                                                   vae.latents_std)
    return LTX2Pipeline._unpack_audio_latents(packed, z.shape[2], z.shape[3])[0].numpy()


@pytest.fixture(scope="module")
def ltx2(tmp_path_factory):
    return _model(str(tmp_path_factory.mktemp("ltx2")))


def _cfg(tmp_path, model, **kw) -> Config:
    return Config(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=model, num_frames=FRAMES,
                  height=SIZE, width=SIZE, device="cpu", dtype="float32", latent_dtype="float32", num_actors=(1, 1),
                  audio_latents=True, **kw)


def test_audio_latents_match_the_trainer_and_pipeline_on_a_tone(ltx2, tmp_path):
    os.makedirs(tmp_path / "in")
    tone = _rising_tone(2 * FRAMES / FPS)
    path = _video_with_tone(str(tmp_path / "in" / "tone.mkv"), 2 * FRAMES, tone)
    cfg, info = validate(_cfg(tmp_path, ltx2))
    assert cfg.audio_sample_rate == RATE
    clips = list(decode.decode_clips({"source_uri": path, "size": os.path.getsize(path)}, cfg))
    assert len(clips) == 2 and clips[0]["audio"].dtype == np.float32 and clips[0]["audio_rate"] == RATE
    n = int(FRAMES / FPS * RATE)
    assert clips[0]["audio"].shape == (2, n)  # PCM at the source's rate (here the VAE's) crosses, not the mel
    batch = {k: np.stack([c[k] for c in clips]) if k in ("frames", "audio") else np.array([c[k] for c in clips])
             for k in clips[0]}
    got = VAEEncoder(cfg, info)(batch)[AUDIO_LATENTS]
    for k, clip in enumerate(clips):
        start = round(k * FRAMES / FPS * RATE)  # each clip's span starts at its first frame's time
        expected = _reference(ltx2, tone[None, start:start + n])
        assert got[k].shape == expected.shape == info.audio.latent_shape(FRAMES, FPS)
        rel = np.linalg.norm(got[k] - expected) / np.linalg.norm(expected)
        assert rel <= 1e-4, rel


def test_resample_equals_torchaudios_own_output():
    """pipeline.audio.resample against torchaudio 2.11.1's resample run on the same inputs
    (tests/data/resample_golden.py says how the golden outputs were made)."""
    from pipeline.audio import resample, resampled_length
    from tests.data.resample_golden import RATES, TARGET, golden_path, inputs

    for rate in RATES:
        expected, pcm = np.load(golden_path(rate)), inputs(rate)
        got = resample(torch.from_numpy(pcm), rate, TARGET).numpy()
        assert got.shape == expected.shape == (2, resampled_length(pcm.shape[1], rate, TARGET))
        assert np.abs(got - expected).max() <= 1e-6, (rate, np.abs(got - expected).max())
    same = torch.ones(2, 5)
    assert resample(same, RATE, RATE) is same  # torchaudio returns the waveform itself at equal rates


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_a_48khz_tone_is_resampled_on_the_device_as_the_trainer_resamples_it(ltx2, tmp_path):
    """The PCM crosses at 48 kHz with its rate; the actor's latents are the trainer's path (cut at
    48 kHz, stereo, torchaudio's resample to 16 kHz, mel, encode, normalise), and not the old
    path's (libswresample to 16 kHz on the CPU)."""
    import av

    native = 48000
    os.makedirs(tmp_path / "in")
    tone = _rising_tone(FRAMES / FPS, native)
    path = _video_with_tone(str(tmp_path / "in" / "tone48k.mkv"), FRAMES, tone, rate=native)
    cfg, info = validate(_cfg(tmp_path, ltx2))
    (clip,) = list(decode.decode_clips({"source_uri": path, "size": os.path.getsize(path)}, cfg))
    n = int(FRAMES / FPS * native)
    assert clip["audio_rate"] == native and clip["audio"].shape == (2, n)
    batch = {k: np.stack([v]) if k in ("frames", "audio") else np.array([v]) for k, v in clip.items()}
    got = VAEEncoder(cfg, info)(batch)[AUDIO_LATENTS][0]
    expected = _reference(ltx2, tone[None, :n], native)
    assert got.shape == expected.shape == info.audio.latent_shape(FRAMES, FPS, native)
    assert _rel(got, expected) <= 1e-4, _rel(got, expected)

    old = av.AudioResampler(format="fltp", layout="mono", rate=RATE)  # what crossed before
    frame = av.AudioFrame.from_ndarray(tone[None], format="flt", layout="mono")
    frame.sample_rate = native
    swr = np.concatenate([f.to_ndarray() for f in old.resample(frame) + old.resample(None)], axis=1)
    before = _reference(ltx2, swr[:, :int(FRAMES / FPS * RATE)])
    assert before.shape == expected.shape and _rel(before, expected) > 1e-3, _rel(before, expected)


def test_an_audio_rate_torchaudio_cannot_resample_sanely_is_an_input_error(ltx2, tmp_path):
    """44099 Hz shares no divisor with 16 kHz but 1: torchaudio's kernel would be 16000 x ~44000
    weights. The input gets an error row; the run (and the device) is spared."""
    os.makedirs(tmp_path / "in")
    path = _video_with_tone(str(tmp_path / "in" / "odd.mkv"), FRAMES, _rising_tone(FRAMES / FPS, 44099), rate=44099)
    cfg, _ = validate(_cfg(tmp_path, ltx2))
    assert list(decode.decode_clips({"source_uri": path, "size": os.path.getsize(path)}, cfg)) == []
    (error,) = [pq.read_table(f).to_pylist()[0] for f in glob.glob(str(tmp_path / "out" / "**" / "*.parquet"),
                                                                   recursive=True) if "error" in f]
    assert (error["error_type"], error["error_class"]) == ("OddAudioRate", "input")


def test_a_video_without_audio_gets_an_input_error_row(ltx2, tmp_path):
    os.makedirs(tmp_path / "in")
    path = _video_with_tone(str(tmp_path / "in" / "silent.mkv"), FRAMES, None)
    cfg, _ = validate(_cfg(tmp_path, ltx2))
    assert list(decode.decode_clips({"source_uri": path, "size": os.path.getsize(path)}, cfg)) == []
    (error,) = [pq.read_table(f).to_pylist()[0] for f in glob.glob(str(tmp_path / "out" / "**" / "*.parquet"),
                                                                   recursive=True) if "error" in f]
    assert (error["error_type"], error["error_class"]) == ("NoAudioStream", "input")


def test_audio_latents_are_part_of_the_jobs_identity(ltx2, tmp_path):
    from pipeline import job

    os.makedirs(tmp_path / "in")
    with_audio = job.identity(*validate(_cfg(tmp_path, ltx2)))
    without = job.identity(*validate(_cfg(tmp_path, ltx2).replace(audio_latents=False)))
    assert with_audio["--audio-latents"] and without["--audio-latents"] is None


def _encode(args) -> subprocess.CompletedProcess:
    """The CLI in its own process, on its own local Ray, as a user runs it."""
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", "encode", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """One --audio-latents run through the CLI: a video with a tone (two clips) and one without audio."""
    root = tmp_path_factory.mktemp("audio-run")
    model = _model(str(root / "ltx2"), vocoder=True)
    os.makedirs(root / "in")
    tone = _rising_tone(2 * FRAMES / FPS)
    _video_with_tone(str(root / "in" / "tone.mkv"), 2 * FRAMES, tone)
    _video_with_tone(str(root / "in" / "silent.mkv"), FRAMES, None)
    args = [root / "in", root / "out", "--model", model, "--num-frames", FRAMES, "--height", SIZE, "--width", SIZE,
            "--dtype", "float32", "--latent-dtype", "float32", "--audio-latents"]
    proc = _encode(args)
    return {"root": root, "model": model, "out": str(root / "out"), "tone": tone, "args": args, "proc": proc}


def _latent_rows(out: str) -> list[dict]:
    import pyarrow.dataset as pads

    table = pads.dataset(os.path.join(out, "latents"), format="parquet").to_table().sort_by("clip_id")
    audio = table.column(AUDIO_LATENTS).combine_chunks().to_numpy_ndarray()
    return [{**row, AUDIO_LATENTS: audio[i]} for i, row in
            enumerate(table.drop_columns([AUDIO_LATENTS, "latents"]).to_pylist())]


def _pipeline_sound(model: str, latents: np.ndarray) -> np.ndarray:
    """int16 [channels, n]: LTX2Pipeline's own steps from stored (normalised) audio latents to sound
    (diffusers 0.42.1 pipeline_ltx2.py:1623-1626: _denormalize_audio_latents on the packed latents,
    _unpack_audio_latents; 1662-1664: audio_vae.decode, then the vocoder), quantised as diffusers
    writes it (utils/export_utils.py:285-287)."""
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    audio_vae = diffusers.AutoencoderKLLTX2Audio.from_pretrained(model, subfolder="audio_vae").eval()
    vocoder = LTX2Vocoder.from_pretrained(model, subfolder="vocoder").eval()
    z = torch.tensor(latents)[None]
    with torch.no_grad():
        packed = LTX2Pipeline._denormalize_audio_latents(LTX2Pipeline._pack_audio_latents(z), audio_vae.latents_mean,
                                                         audio_vae.latents_std)
        unpacked = LTX2Pipeline._unpack_audio_latents(packed, z.shape[2], num_mel_bins=z.shape[3])
        sound = vocoder(audio_vae.decode(unpacked, return_dict=False)[0])[0]
    return (torch.clip(sound, -1.0, 1.0) * 32767.0).to(torch.int16).numpy()


def test_preview_writes_each_clips_sound_as_the_pipeline_decodes_it(audio_run, capsys):
    from pipeline.cli import main

    assert audio_run["proc"].returncode == 0, audio_run["proc"].stderr[-3000:]
    out = audio_run["out"]
    assert main(["preview", out, "--model", audio_run["model"], "--n", "2"]) == 0
    assert "no WAV" not in capsys.readouterr().out
    rows = _latent_rows(out)
    assert len(rows) == 2
    for row in rows:
        expected = _pipeline_sound(audio_run["model"], row[AUDIO_LATENTS])
        assert np.abs(expected).max() > 100  # the check below is not on near-silence
        with wave.open(os.path.join(out, "preview", f"{row['clip_id']}.wav")) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (VOCODER["output_sampling_rate"], 2, 2)
            assert w.getnframes() == expected.shape[1]
            got = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2).T
        assert np.abs(got.astype(np.int32) - expected).max() <= 1
        assert os.path.exists(os.path.join(out, "preview", f"{row['clip_id']}.png"))


def test_preview_without_a_vocoder_says_so_and_writes_the_rest(audio_run, tmp_path, capsys):
    from pipeline.cli import main

    assert audio_run["proc"].returncode == 0, audio_run["proc"].stderr[-3000:]
    model = shutil.copytree(audio_run["model"], str(tmp_path / "m"), ignore=shutil.ignore_patterns("vocoder"))
    assert main(["preview", audio_run["out"], "--model", model, "--n", "1", "--out", str(tmp_path / "p")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "WAV" in line]
    assert lines == [f"preview: no WAV files: no vocoder/config.json in {model}"]
    assert sorted(os.path.splitext(f)[1] for f in os.listdir(tmp_path / "p")) == [".csv", ".mp4", ".png"]


def test_plan_sizes_each_videos_audio_at_its_own_rate(ray_local, ltx2, tmp_path, capsys):
    """A clip's audio spans num_frames / the video's rate: at 24 and 30 fps, the bytes plan gives
    each clip are what the run writes for it."""
    from pipeline.cli import main

    videos = tmp_path / "in"
    os.makedirs(videos)
    for fps in (24, 30):
        _video_with_tone(str(videos / f"v{fps}.mkv"), FRAMES, _rising_tone(FRAMES / fps), fps)
    options = ["--model", ltx2, "--num-frames", FRAMES, "--height", SIZE, "--width", SIZE, "--dtype", "float32",
               "--latent-dtype", "float32", "--audio-latents"]
    assert main(["plan", str(videos), *map(str, options), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["encode", str(videos), str(tmp_path / "out"), *map(str, options)]) == 0

    written = {}  # per video, the bytes of its clip's tensors
    for path in glob.glob(str(tmp_path / "out" / "latents" / "**" / "*.parquet"), recursive=True):
        table = pq.read_table(path)  # one file per audio length: their tensor types differ
        for i, uri in enumerate(table.column("source_uri").to_pylist()):
            written[os.path.basename(uri)] = sum(table.column(name).combine_chunks().to_numpy_ndarray()[i].nbytes
                                                 for name in ("latents", AUDIO_LATENTS))
    assert len(written) == 2 and written["v24.mkv"] != written["v30.mkv"]
    assert plan["latent_bytes"] == sum(written.values())
    assert plan["bytes_per_clip"] == [min(written.values()), max(written.values())]


def _files(folder) -> dict:
    return {os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
            for root, _dirs, files in os.walk(folder) for f in files}


def test_the_cli_end_to_end_encodes_audio_records_a_silent_video_and_resumes(audio_run):
    """--audio-latents through the CLI on its own Ray: the tone's clips carry the trainer's audio
    latents, the video without audio is one final input error row, and a rerun finds both inputs
    done (the error row too: it is not retried) and leaves every byte as it was."""
    proc, out = audio_run["proc"], audio_run["out"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["videos"], summary["clips"], summary["errors"]) == (2, 2, 1)

    errors = pq.read_table(os.path.join(out, "errors")).to_pylist()
    assert [(os.path.basename(e["source_uri"]), e["error_type"], e["error_class"], e["retryable"])
            for e in errors] == [("silent.mkv", "NoAudioStream", "input", False)]

    rows = sorted(_latent_rows(out), key=lambda r: r["start_frame"])
    assert [(os.path.basename(r["source_uri"]), r["start_frame"]) for r in rows] == [("tone.mkv", 0),
                                                                                    ("tone.mkv", FRAMES)]
    n = int(FRAMES / FPS * RATE)
    shape = inspect_audio(audio_run["model"]).latent_shape(FRAMES, FPS)
    for k, row in enumerate(rows):
        start = round(k * FRAMES / FPS * RATE)
        expected = _reference(audio_run["model"], audio_run["tone"][None, start:start + n])
        assert row[AUDIO_LATENTS].shape == expected.shape == shape
        assert np.linalg.norm(row[AUDIO_LATENTS] - expected) / np.linalg.norm(expected) <= 1e-4

    before = _files(out)
    again = _encode(audio_run["args"])
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(again.stdout.strip().splitlines()[-1])
    assert (resumed["clips_this_run"], resumed["videos_already_done"]) == (0, 2)
    after = _files(out)
    assert {k: v for k, v in after.items() if k.startswith(("latents", "errors"))} == \
        {k: v for k, v in before.items() if k.startswith(("latents", "errors"))}

