"""LTX-2's audio latents (--audio-latents): each clip's sound, as the LTX-2 trainer prepares it.

CPU side: the clip's span of the audio stream is decoded with PyAV at the stream's own rate,
mixed to stereo, and crosses the object store as float32 PCM [2, n] with its rate. Device side
(run by the encoder actor): ``resample`` to the audio VAE's ``sample_rate`` and the log-mel
spectrogram (``log_mel``), both as the trainer's ``AudioProcessor`` computes them with torchaudio
(Lightricks/LTX-2 @400fd31, packages/ltx-core/src/ltx_core/model/audio_vae/ops.py:7-55), written
here in torch alone (no torchaudio build exists for our torch); the latents are then normalised as
``LTX2Pipeline._normalize_audio_latents`` does (diffusers 0.42.1, pipeline_ltx2.py:706-710).
"""
from __future__ import annotations

import io
import math
import wave
from dataclasses import dataclass

import numpy as np

from pipeline.failures import InputError

AUDIO_SUBFOLDER = "audio_vae"
AUDIO_CLASSES = ("AutoencoderKLLTX2Audio",)
# preview: mel spectrogram -> sound, the LTX2Pipeline component ``vocoder`` (diffusers 0.42.1,
# pipeline_ltx2.py:250; classes in pipelines/ltx2/vocoder.py), in ``vocoder/`` of a diffusers folder
VOCODER_SUBFOLDER = "vocoder"
VOCODER_CLASSES = ("LTX2Vocoder", "LTX2VocoderWithBWE")
# The STFT size is not in diffusers' config; the trainer's default (ltx_core
# model_configurator.py:158, ``filter_length`` 1024), as diffusers' Echo encoder uses it too.
N_FFT = 1024
LOG_FLOOR = 1e-5  # ops.py:53: log(clamp(mel, min=1e-5))
LAYOUT = "CLM"  # channels, latent time, latent mel bins: the trainer's saved layout
# torchaudio.functional.resample's defaults, which the trainer calls it with (ops.py:40)
LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99
RESAMPLE = {"function": "torchaudio.functional.resample", "method": "sinc_interp_hann",
            "lowpass_filter_width": LOWPASS_FILTER_WIDTH, "rolloff": ROLLOFF}
# Kernel weights (new / gcd x (orig / gcd + 2 width)) above this are an input's odd rate, not a
# model's need: 44.1 kHz to 16 kHz needs 160 x 475, a coprime rate ~16000 x 44000 (GBs).
MAX_KERNEL = 1 << 22


class NoAudioStream(InputError):
    """--audio-latents, and the video has no audio stream. The LTX-2 trainer writes no audio
    latents for such a video (process_videos.py:596-599) and trains on both, so no silence is
    made up for it: the input gets an error row."""

    stage = "decode"


class OddAudioRate(InputError):
    """The audio stream's rate shares so small a divisor with the audio VAE's that resampling it
    exactly as torchaudio does would need a kernel of gigabytes (torchaudio would try)."""

    stage = "decode"


class AudioFormatChanged(InputError):
    """The audio stream changes its sample rate or channel count mid-stream: one clip's PCM
    has one rate and one layout."""

    stage = "decode"


def clip_samples(num_frames: int, fps: float, rate: int) -> int:
    """PCM samples of a clip at the source's ``rate``: its duration, num_frames / fps, as the
    trainer cuts it (process_videos.py:170-172, 205: int(duration * rate) at the file's own rate,
    padded with zeros past the end)."""
    return int(num_frames / fps * rate)


def resampled_length(n: int, orig: int, new: int) -> int:
    """Samples out of ``resample`` for n in: torchaudio's ceil(new * n / orig) on the rates
    divided by their gcd, the quotient a Python float made a float32 tensor before the ceil
    (functional.py, _apply_sinc_resample_kernel: ``torch.as_tensor`` takes the default dtype),
    so a long clip whose quotient lies within float32's step above a whole number gets that
    number, not one more."""
    if orig == new:
        return n
    gcd = math.gcd(orig, new)
    return int(math.ceil(float(np.float32(new // gcd * n / (orig // gcd)))))


def _kernel_geometry(orig: int, new: int) -> tuple[int, int, float, int]:
    """(orig, new) divided by their gcd, the filter's base frequency and its half-width in input
    samples, as _get_sinc_resample_kernel computes them."""
    gcd = math.gcd(int(orig), int(new))
    orig, new = int(orig) // gcd, int(new) // gcd
    base = min(orig, new) * ROLLOFF
    return orig, new, base, math.ceil(LOWPASS_FILTER_WIDTH * orig / base)


def kernel_size(orig: int, new: int) -> int:
    """Weights in ``resample``'s kernel from ``orig`` to ``new`` Hz (_get_sinc_resample_kernel)."""
    if orig == new:
        return 0
    orig, new, _, width = _kernel_geometry(orig, new)
    return new * (orig + 2 * width)


def resample(waveform, orig: int, new: int):
    """[..., n] at ``orig`` Hz -> [..., resampled_length(n)] at ``new`` Hz, on the waveform's
    device and in its dtype: torchaudio.functional.resample(waveform, orig, new) with its
    defaults, as the trainer's AudioProcessor.resample_audio calls it (ops.py:36-42), ported from
    pytorch/audio src/torchaudio/functional/functional.py @b29b6ad9 (the same three functions are
    lines 1305-1492 of torchaudio 2.11.1's wheel): ``resample`` returns the waveform itself at
    equal rates; ``_get_sinc_resample_kernel`` builds a Hann-windowed sinc per output phase after
    dividing both rates by their gcd, in the waveform's dtype; ``_apply_sinc_resample_kernel``
    pads (width, width + orig), convolves with stride orig and keeps the first ceil(new * n /
    orig) samples. Checked against torchaudio's own output in tests/data/."""
    import torch

    if orig == new:
        return waveform
    orig, new, base, width = _kernel_geometry(orig, new)
    device, dtype = waveform.device, waveform.dtype
    idx = torch.arange(-width, width + orig, dtype=dtype, device=device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None, None] / new + idx
    t *= base
    t = t.clamp_(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t *= math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernel *= window * (base / orig)

    shape = waveform.size()
    flat = waveform.reshape(-1, shape[-1])
    count, length = flat.shape
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(padded[:, None], kernel, stride=orig).transpose(1, 2).reshape(count, -1)
    out = out[..., :resampled_length(length, orig, new)]
    return out.view(shape[:-1] + out.shape[-1:])


@dataclass(frozen=True)
class AudioInfo:
    class_name: str
    subfolder: str
    sample_rate: int
    hop_length: int
    mel_bins: int
    in_channels: int
    latent_channels: int
    downsamples: int  # stride-2 stages in time and in mel bins
    causality_axis: str
    config: dict
    files: tuple = ()

    def num_samples(self, num_frames: int, fps: float, rate: int | None = None) -> int:
        """PCM samples at the VAE's rate of a clip whose source sounds at ``rate`` (the VAE's
        when not given): cut at that rate, then resampled."""
        rate = rate or self.sample_rate
        return resampled_length(clip_samples(num_frames, fps, rate), rate, self.sample_rate)

    def latent_shape(self, num_frames: int, fps: float, rate: int | None = None) -> tuple[int, int, int]:
        """[C, L, M] of one clip's audio latents (its source at ``rate``): mel frames n // hop + 1
        (a centred STFT), then each of the encoder's stride-2 convolutions after its causal padding
        (LTX2AudioDownsample: 2 rows before in time for "height", else 1 after)."""
        time = self.num_samples(num_frames, fps, rate) // self.hop_length + 1
        mel = self.mel_bins
        time_pad, mel_pad = {"height": (2, 1), "width": (1, 2)}.get(self.causality_axis, (1, 1))
        for _ in range(self.downsamples):
            time = (time + time_pad - 3) // 2 + 1
            mel = (mel + mel_pad - 3) // 2 + 1
        return self.latent_channels, time, mel

    def identity(self) -> dict:
        return {"class": self.class_name, "config": self.config, "files": list(self.files), "n_fft": N_FFT,
                "resample": RESAMPLE}

    def metadata(self, num_frames: int, fps: float | None) -> dict:
        return {"vae_class": self.class_name, "subfolder": self.subfolder, "layout": LAYOUT,
                "latent_shape": list(self.latent_shape(num_frames, fps)) if fps else None,
                "sample_rate": self.sample_rate, "mel_hop_length": self.hop_length, "mel_bins": self.mel_bins,
                "n_fft": N_FFT, "resample": RESAMPLE,
                "mel": "log(clamp(MelSpectrogram(power=1, slaney, centred, reflect), 1e-5))",
                "normalization": "(z - latents_mean) / latents_std per (channel, mel bin): "
                                 "LTX2Pipeline._normalize_audio_latents on the packed latents",
                "span": "num_frames / fps seconds from the clip's first frame's time, cut at the source's "
                        "rate, then resampled"}


def inspect_audio(source: str, endpoint=None) -> AudioInfo:
    """The audio VAE beside the video VAE (``audio_vae/`` of a diffusers LTX-2 folder)."""
    from pipeline.model import ModelError, _read_config_file, folder_files

    config = _read_config_file(source, AUDIO_SUBFOLDER, endpoint)
    if config is None:
        raise ModelError(f"--audio-latents: no {AUDIO_SUBFOLDER}/config.json in {source}")
    name = config.get("_class_name", "")
    if name not in AUDIO_CLASSES:
        raise ModelError(f"--audio-latents: {name or 'unknown class'} is not a supported audio VAE "
                         f"(supported: {', '.join(AUDIO_CLASSES)})")
    return AudioInfo(class_name=name, subfolder=AUDIO_SUBFOLDER, sample_rate=int(config["sample_rate"]),
                     hop_length=int(config["mel_hop_length"]), mel_bins=int(config["mel_bins"]),
                     in_channels=int(config["in_channels"]), latent_channels=int(config["latent_channels"]),
                     downsamples=len(config["ch_mult"]) - 1, causality_axis=str(config["causality_axis"]),
                     config=config, files=folder_files(source, AUDIO_SUBFOLDER, endpoint))


def to_stereo(pcm: np.ndarray) -> np.ndarray:
    """[channels, n] -> [2, n], as the trainer mixes (process_videos.py:866-895): mono doubled,
    5.1 and 7.1 folded down with its weights, any other layout averaged and doubled."""
    channels = pcm.shape[0]
    if channels == 2:
        return pcm
    if channels == 1:
        return np.repeat(pcm, 2, axis=0)
    if channels in (6, 8):
        total = 2.414 if channels == 6 else 3.121
        main, other = 1.0 / total, 0.707 / total
        back = (pcm[6], pcm[7]) if channels == 8 else (0.0, 0.0)
        left = main * pcm[0] + other * (pcm[2] + pcm[4] + back[0])
        right = main * pcm[1] + other * (pcm[2] + pcm[5] + back[1])
        return np.stack([left, right]).astype(np.float32)
    return np.repeat(pcm.mean(axis=0, keepdims=True), 2, axis=0)


class AudioSpans:
    """A video's audio stream, decoded forward once at its own rate (float32 planar), its spans
    handed out in order: memory holds one span, never the whole track. Spans start at
    non-decreasing times (clips come in order); sample k of the track is at t0 + k / rate, t0
    being its first decoded frame's time and rate its first frame's. Samples before the track
    starts or after it ends are zeros, as the trainer pads. A frame at another rate or channel
    count than the first fails the input (AudioFormatChanged)."""

    def __init__(self, container, vae_rate: int, begin: float | None = None):
        import av

        if not container.streams.audio:
            raise NoAudioStream("--audio-latents: the video has no audio stream")
        self.stream = container.streams.audio[0]
        self.vae_rate = vae_rate
        if begin:  # a part or a span of a long video: start a second early, then cut by time
            container.seek(int(max(0.0, begin - 1.0) / self.stream.time_base), stream=self.stream, backward=True)
        self.rate = int(self.stream.sample_rate or vae_rate)  # the header's, until a frame says
        self.channels: int | None = None
        self.resampler = av.AudioResampler(format="fltp")  # the stream's own rate and layout
        self.frames = self._decoded(container)
        self.t0: float | None = None
        self.start = 0  # index of the first buffered sample
        self.chunks: list[np.ndarray] = []
        self.ended = False

    def _decoded(self, container):
        for frame in container.decode(self.stream):
            self._check(frame)
            if self.t0 is None and frame.time is not None:
                self.t0 = frame.time
            for out in self.resampler.resample(frame):
                yield out.to_ndarray()
        for out in self.resampler.resample(None):
            yield out.to_ndarray()

    def _check(self, frame) -> None:
        channels = len(frame.layout.channels)
        if self.channels is None:
            self.rate, self.channels = int(frame.sample_rate), channels
            weights = kernel_size(self.rate, self.vae_rate)
            if weights > MAX_KERNEL:
                raise OddAudioRate(f"--audio-latents: the audio is at {self.rate} Hz; resampling it to "
                                   f"{self.vae_rate} Hz as torchaudio does needs a kernel of {weights} weights")
        elif (int(frame.sample_rate), channels) != (self.rate, self.channels):
            raise AudioFormatChanged(f"--audio-latents: the audio changes from {self.rate} Hz, {self.channels} "
                                     f"channels to {frame.sample_rate} Hz, {channels} channels at "
                                     f"{frame.time if frame.time is not None else '?'} s")

    def _buffered(self) -> int:
        return self.start + sum(c.shape[1] for c in self.chunks)

    def _fill(self, upto: int | None) -> None:
        """Decode until the buffer holds sample ``upto`` - 1 (or, with None, the first frame)."""
        while not self.ended and (self.t0 is None or (upto is not None and self._buffered() < upto)):
            chunk = next(self.frames, None)
            if chunk is None:
                self.ended = True
            else:
                self.chunks.append(np.asarray(chunk, dtype=np.float32))

    def take(self, t: float, num_frames: int, fps: float) -> tuple[np.ndarray, int]:
        """([2, n] float32, rate): a clip's sound from time t on at the stream's rate, n =
        clip_samples(num_frames, fps, rate) as the trainer cuts it."""
        self._fill(None)  # the first frame tells the rate
        n = clip_samples(num_frames, fps, self.rate)
        self._fill(self._index(t) + n if self.t0 is not None else None)
        first = self._index(t) if self.t0 is not None else 0
        have = np.concatenate(self.chunks, axis=1) if self.chunks else np.zeros((1, 0), np.float32)
        out = np.zeros((have.shape[0] or 1, n), dtype=np.float32)
        lo, hi = max(first, self.start), min(first + n, self.start + have.shape[1])
        if hi > lo:
            out[:, lo - first:hi - first] = have[:, lo - self.start:hi - self.start]
        drop = max(0, first - self.start)  # later spans start at or after t
        self.chunks, self.start = ([have[:, drop:]] if have.shape[1] > drop else []), self.start + drop
        return np.ascontiguousarray(to_stereo(out), dtype=np.float32), self.rate

    def _index(self, t: float) -> int:
        return round((t - self.t0) * self.rate)


def log_mel(waveform, info: AudioInfo):
    """float32 [B, 2, n] -> [B, 2, T, mel_bins] on the waveform's device: torchaudio's
    MelSpectrogram as the trainer configures it (ops.py:20-33: n_fft, a periodic Hann window of
    n_fft, hop mel_hop_length, centred with reflection, power 1, f 0..rate/2, slaney scale and
    norm), then log(clamp(., 1e-5)) and [.., time, mel] (ops.py:52-55). The filter bank is
    torchaudio.functional.melscale_fbanks (pytorch/audio functional.py)."""
    import torch

    batch, channels, n = waveform.shape
    window = torch.hann_window(N_FFT, device=waveform.device)
    spec = torch.stft(waveform.reshape(-1, n).float(), n_fft=N_FFT, hop_length=info.hop_length, win_length=N_FFT,
                      window=window, center=True, pad_mode="reflect", normalized=False, onesided=True,
                      return_complex=True).abs()  # [B*2, freqs, T]
    fb = mel_filterbank(N_FFT // 2 + 1, info.sample_rate, info.mel_bins).to(waveform.device)
    mel = torch.matmul(spec.transpose(-1, -2), fb)  # [B*2, T, mel]
    return torch.log(torch.clamp(mel, min=LOG_FLOOR)).reshape(batch, channels, *mel.shape[-2:])


def _hz_to_mel(freq: float) -> float:
    """Slaney's mel scale (torchaudio's _hz_to_mel, mel_scale="slaney")."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    if freq < min_log_hz:
        return freq / f_sp
    return min_log_hz / f_sp + math.log(freq / min_log_hz) / (math.log(6.4) / 27.0)


def mel_filterbank(n_freqs: int, sample_rate: int, n_mels: int):
    """[n_freqs, n_mels]: torchaudio.functional.melscale_fbanks(n_freqs, 0, sample_rate / 2,
    n_mels, sample_rate, norm="slaney", mel_scale="slaney")."""
    import torch

    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_pts = torch.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), n_mels + 2)
    f_pts = f_sp * m_pts
    log_t = m_pts >= min_log_mel
    f_pts[log_t] = min_log_hz * torch.exp(logstep * (m_pts[log_t] - min_log_mel))
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down, up = (-1.0 * slopes[:, :-2]) / f_diff[:-1], slopes[:, 2:] / f_diff[1:]
    fb = torch.max(torch.zeros(1), torch.min(down, up))
    return fb * (2.0 / (f_pts[2:n_mels + 2] - f_pts[:n_mels])).unsqueeze(0)


def normalize(z, vae):
    """LTX2Pipeline._normalize_audio_latents on the packed [B, L, C*M] latents, written on the
    unpacked [B, C, L, M] ones: the statistics are per (channel, mel bin), in packing order."""
    b, c, length, m = z.shape
    mean = vae.latents_mean.to(z.device, z.dtype).view(1, c, 1, m)
    std = vae.latents_std.to(z.device, z.dtype).view(1, c, 1, m)
    return (z - mean) / std


def denormalize(z, vae):
    b, c, length, m = z.shape
    return z * vae.latents_std.to(z.device, z.dtype).view(1, c, 1, m) \
        + vae.latents_mean.to(z.device, z.dtype).view(1, c, 1, m)


def load_vocoder(source: str, s3=None, revision: str | None = None, device: str = "cpu",
                 allow_pickle: bool = False):
    """The model's vocoder (``vocoder/`` beside ``audio_vae/``), in float32; or, when the folder
    has none or an unknown one, a one-line reason (str) why no sound can be made."""
    import importlib

    import torch

    from pipeline.model import _read_config_file, fetch_folder, folder_files

    config = _read_config_file(source, VOCODER_SUBFOLDER, s3, revision)
    if config is None:
        return f"no {VOCODER_SUBFOLDER}/config.json in {source}"
    name = config.get("_class_name", "")
    if name not in VOCODER_CLASSES:
        return f"{name or 'unknown class'} in {VOCODER_SUBFOLDER}/ is not a supported vocoder " \
               f"(supported: {', '.join(VOCODER_CLASSES)})"
    cls = getattr(importlib.import_module("diffusers.pipelines.ltx2.vocoder"), name)
    folder = fetch_folder(source, VOCODER_SUBFOLDER, folder_files(source, VOCODER_SUBFOLDER, s3), s3)
    vocoder = cls.from_pretrained(folder, revision=revision, subfolder=VOCODER_SUBFOLDER, torch_dtype=torch.float32,
                                  use_safetensors=None if allow_pickle else True)
    return vocoder.to(device).eval().requires_grad_(False)


def decode_audio(latents, audio_vae, vocoder) -> np.ndarray:
    """Stored audio latents [C, L, M] -> float32 sound [channels, n] at the vocoder's
    ``output_sampling_rate``, as LTX2Pipeline turns its audio latents into sound (diffusers
    0.42.1, pipeline_ltx2.py:1623-1626 de-normalise and unpack, 1662-1664 audio VAE decode to a
    mel spectrogram, then the vocoder)."""
    import torch

    z = torch.as_tensor(np.asarray(latents), dtype=torch.float32)[None].to(audio_vae.device)
    with torch.inference_mode():
        mel = audio_vae.decode(denormalize(z, audio_vae), return_dict=False)[0]
        sound = vocoder(mel.to(vocoder.device, vocoder.dtype))
    return sound[0].float().cpu().numpy()


def wav_bytes(sound: np.ndarray, rate: int) -> bytes:
    """A 16-bit PCM WAV of float sound [channels, n], quantised as diffusers writes LTX-2's audio
    (utils/export_utils.py:285-287: clip to [-1, 1], times 32767, cast to int16)."""
    pcm = (np.clip(sound, -1.0, 1.0) * np.float32(32767.0)).astype("<i2")  # the cast truncates, as torch's
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(np.ascontiguousarray(pcm.T).tobytes())  # interleaved frames
    return out.getvalue()
