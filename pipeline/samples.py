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
                format: str | None = None) -> str:
    """Encode uint8 [F, H, W, 3] RGB frames to a video file with PyAV.

    ``rotation`` sets a display matrix (counter-clockwise degrees); ``timestamps_ms`` gives each
    frame's time, for variable frame rates; ``options`` go to the encoder, ``container_options``
    to the muxer (``{"movflags": "faststart"}``), ``format`` names the muxer (``"image2"``).
    """
    import av
    from fractions import Fraction

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w", format=format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = {**({"preset": "ultrafast"} if codec == "libx264" else {}), **(options or {})}
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
