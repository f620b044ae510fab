"""Sample inputs for the demo and the tests: small generated videos and a tiny random-weight VAE.

Nothing here is downloaded: videos are encoded with PyAV, and the VAE is built from diffusers'
own class and saved with ``save_pretrained``, so it loads through the same ``from_pretrained``
path as real weights.
"""
from __future__ import annotations

import os

import numpy as np

# Small enough to encode in well under a second on one CPU core; same class and layout as the
# real CogVideoX VAE (4 levels -> 8x spatial, 4x temporal compression).
TINY_COGVIDEOX = dict(
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=2,
)


def synthetic_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [F, H, W, 3]: moving gradients plus noise, so clips differ and codecs have work."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        for c in range(3):
            wave = np.sin(xx / (7 + 3 * c) + yy / (11 + 2 * c) + phase[c] + 0.3 * t)
            frames[t, :, :, c] = np.clip(127.5 + 100 * wave + rng.normal(0, 8, wave.shape), 0, 255)
    return frames


def write_video(path: str, frames: np.ndarray, fps: int = 24, codec: str = "libx264",
                pix_fmt: str = "yuv420p", options: dict | None = None, container_options: dict | None = None,
                rotation: int | None = None, timestamps_ms: list[int] | None = None,
                format: str | None = None, metadata: dict | None = None) -> str:
    """Encode uint8 [F, H, W, 3] RGB frames to a video file with PyAV.

    ``rotation`` sets a display matrix (counter-clockwise degrees); ``timestamps_ms`` gives each
    frame's time, for variable frame rates; ``options`` go to the encoder, ``container_options``
    to the muxer (``{"movflags": "faststart"}``), ``format`` names the muxer (``"image2"``),
    ``metadata`` are the stream's tags (``{"NUMBER_OF_FRAMES": "45"}`` in an MKV).
    """
    import av
    from fractions import Fraction

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w", format=format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = {**({"preset": "ultrafast"} if codec == "libx264" else {}), **(options or {})}
        stream.metadata.update(metadata or {})
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if timestamps_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if timestamps_ms is not None:
                frame.pts, frame.time_base = timestamps_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_tiny_vae(folder: str, seed: int = 0, **overrides) -> str:
    """Save a tiny random-weight AutoencoderKLCogVideoX to ``folder/vae`` (a pipeline's layout)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(**{**TINY_COGVIDEOX, **overrides})
    vae.save_pretrained(os.path.join(folder, "vae"))
    return folder


def make_sample_videos(folder: str) -> list[str]:
    """A few videos of different sizes, lengths and codecs, plus one broken and one too short."""
    specs = [
        ("clips/landscape.mp4", 40, 72, 128, "libx264"),
        ("clips/portrait.mp4", 24, 112, 64, "libx264"),
        ("clips/square.webm", 30, 96, 96, "libvpx-vp9"),
        ("more/short.mp4", 5, 64, 64, "libx264"),
    ]
    paths = [write_video(os.path.join(folder, name), synthetic_frames(n, h, w, seed=i), codec=codec)
             for i, (name, n, h, w, codec) in enumerate(specs)]
    broken = os.path.join(folder, "more", "broken.mp4")
    with open(broken, "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return paths + [broken]


CAPTIONS = ["a red ball rolls across a wooden table", "two dogs play in the snow at night",
            "a city street in the rain, seen from above", "waves break on a rocky shore at dawn",
            "a close-up of hands kneading bread dough", "a timelapse of clouds over green hills"]


def make_tiny_text_encoder(folder: str, kind: str = "t5", seed: int = 0) -> str:
    """Save a tiny random-weight text encoder and a tokenizer trained here to ``folder/text_encoder``
    and ``folder/tokenizer`` (a diffusers repository's layout): ``t5`` (CogVideoX, Mochi,
    LTX-Video: T5EncoderModel) or ``umt5`` (Wan: UMT5EncoderModel). The tokenizer is a small
    unigram model with T5's special tokens (pad 0, eos 1, unk 2), wrapped in T5TokenizerFast."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=96, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CAPTIONS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tokenizer = transformers.T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                             unk_token="<unk>", extra_ids=0)
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    torch.manual_seed(seed)
    config_cls, model_cls = {"t5": (transformers.T5Config, transformers.T5EncoderModel),
                             "umt5": (transformers.UMT5Config, transformers.UMT5EncoderModel)}[kind]
    config = config_cls(vocab_size=tok.get_vocab_size(), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model_cls(config).eval().save_pretrained(os.path.join(folder, "text_encoder"))
    return folder


def shot_frames(lengths: list[int], height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [sum(lengths), H, W, 3]: one shot per length, each its own colours and pattern moving
    slowly (a hard cut between shots), for the shot detector's tests and benchmark."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for n in lengths:
        base, amp = rng.uniform(40, 215, size=3), rng.uniform(20, 40, size=3)
        fx, fy, phase = rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.2), rng.uniform(0, 2 * np.pi)
        for t in range(n):
            wave = np.sin(xx * fx + yy * fy + phase + 0.15 * t)[..., None]
            out.append(np.clip(base + amp * wave, 0, 255).astype(np.uint8))
    return np.stack(out)


def pan_frames(num_frames: int, height: int, width: int, step: int = 2, seed: int = 0) -> np.ndarray:
    """uint8 [F, H, W, 3]: a camera panning ``step`` pixels a frame across a wide textured scene."""
    rng = np.random.default_rng(seed)
    wide = width + step * num_frames
    yy, xx = np.mgrid[0:height, 0:wide].astype(np.float32)
    scene = np.stack([127 + 90 * np.sin(xx / (9 + 4 * c) + yy / (13 + 3 * c) + rng.uniform(0, 6)) for c in range(3)],
                     axis=-1)
    scene = np.clip(scene + rng.normal(0, 4, scene.shape), 0, 255).astype(np.uint8)
    return np.stack([scene[:, t * step:t * step + width] for t in range(num_frames)])


def fade(a: np.ndarray, b: np.ndarray, frames: int) -> np.ndarray:
    """uint8 [frames, H, W, 3]: a cross-fade from frame ``a`` to frame ``b`` (a dissolve; a fade to
    black when ``b`` is black), excluding both ends."""
    w = (np.arange(1, frames + 1, dtype=np.float32) / (frames + 1))[:, None, None, None]
    return np.round(a[None].astype(np.float32) * (1 - w) + b[None].astype(np.float32) * w).astype(np.uint8)
