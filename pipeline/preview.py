"""``python -m pipeline preview OUTPUT --model M [--n 8] [--out DIR]``: the quality check.

For a sample of rows: decode the latents back through the VAE (undoing the normalisation the run
applied), cut the same clip from the source again, and write side by side original/reconstruction
PNG strips and mp4s, plus ``psnr.csv``. An LTX-2 OUTPUT with ``audio_latents`` also gets each clip's
sound back as a 16-bit WAV, through the model's audio VAE and vocoder (pipeline.audio.decode_audio).
Written to OUTPUT/preview/ unless --out says otherwise.
"""
from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np

from pipeline import decode, layout, readers, samples, storage
from pipeline.config import Config, ConfigError
from pipeline.model import inspect_model
from pipeline.schema import AUDIO_LATENTS

STRIP_FRAMES = 4  # frames per PNG strip, evenly spaced through the clip


def _job_config(output: str, endpoint: str | None) -> Config:
    """The config the run used, from its _SUCCESS."""
    try:
        recorded = json.loads(storage.read_bytes(storage.join(output, layout.SUCCESS), endpoint))["config"]
    except (FileNotFoundError, OSError, KeyError):
        raise ConfigError(f"{output} has no _SUCCESS: preview needs a completed run") from None
    fields = {k: v for k, v in recorded.items() if k in Config.__dataclass_fields__}
    for key in ("num_actors", "extensions", "extra_columns"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(tuple(x) if isinstance(x, list) else x for x in fields[key])
    return Config(**{**fields, "s3_endpoint": endpoint})


def original_clip(row: dict, cfg: Config) -> np.ndarray:
    """The clip's frames, uint8 [3, F, H, W], cut from its source again as the run cut them."""
    import av

    uri = row["source_uri"]
    path, _, fragment = uri.partition("#t=")
    span = (None, None)
    if fragment:
        begin, _, end = fragment.partition(",")
        span = (float(begin), float(end) if end else None)
    source = storage.open_for_decode(path, cfg.s3)
    with av.open(source) as container:
        for cid, clip in decode.iter_clips(container, uri, cfg, span=span):
            if cid == row["clip_id"]:
                return clip["frames"]
    raise LookupError(f"clip {row['clip_id']} not found again in {uri}")


def reconstruct(vae, info, latents, latent_mode: str):
    """[T, C, h, w] latents as stored -> uint8 [3, F, H, W] decoded by the VAE, de-normalised as
    the family's pipeline does before ``vae.decode`` (e.g. HunyuanVideo15Pipeline: z / scaling_factor;
    LTX2Pipeline._denormalize_latents: z * latents_std / scaling_factor + latents_mean)."""
    import torch

    z = torch.as_tensor(latents, dtype=torch.float32).permute(1, 0, 2, 3)[None]  # [1, C, T, h, w]
    if latent_mode != "dist":  # undo (z - shift - mean) * scale / std
        mean, std = info.channel_stats(vae)
        if std is not None:
            z = z * torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        z = z / info.scaling_factor
        if mean is not None:
            z = z + torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        if info.shift_factor is not None:
            z = z + info.shift_factor
    args = ()
    if vae.config.get("timestep_conditioning"):  # LTX-Video 0.9.1+, LTX-2: the pipelines' default decode
        # timestep 0.0, whose noise scale defaults to it, so no noise (pipeline_ltx2.py:963-964, 1637-1651)
        args = (torch.zeros(1, device=vae.device, dtype=vae.dtype),)
    with torch.inference_mode():
        x = vae.decode(z.to(vae.device, vae.dtype), *args).sample.float()[0]  # [3, F, H, W] in [-1, 1]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _strip(original: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Original frames on top, reconstructions below: uint8 [2H, k*W, 3]."""
    f = min(original.shape[1], recon.shape[1])
    picks = np.linspace(0, f - 1, min(STRIP_FRAMES, f)).round().astype(int)
    rows = [np.concatenate([clip[:, t].transpose(1, 2, 0) for t in picks], axis=1) for clip in (original, recon)]
    return np.concatenate(rows, axis=0)


def _put(uri: str, data: bytes, endpoint) -> None:
    storage.write_bytes_atomic(uri, data, endpoint)


def _sound_models(job: Config, info, model: str, device: str):
    """(audio VAE, vocoder) for an OUTPUT with audio latents, else None; a model folder without a
    vocoder gets one line saying so, and the rest of the preview is written."""
    import dataclasses

    from actors.encoder import load_audio_vae
    from pipeline.audio import inspect_audio, load_vocoder

    if not job.audio_latents:
        return None
    vocoder = load_vocoder(model, job.s3, info.revision, device, job.allow_pickle)
    if isinstance(vocoder, str):
        print(f"preview: no WAV files: {vocoder}")
        return None
    info = dataclasses.replace(info, audio=inspect_audio(model, job.s3))
    return load_audio_vae(job.replace(model=model, device=device), info), vocoder


def preview(output: str, model: str, n: int = 8, out: str | None = None, s3_endpoint: str | None = None,
            device: str = "cpu") -> list[dict]:
    from PIL import Image

    from actors.encoder import load_vae

    endpoint = storage.default_endpoint(s3_endpoint)
    job = _job_config(output, endpoint)
    info = inspect_model(model, None, endpoint)
    vae = load_vae(job.replace(model=model, subfolder=info.subfolder, device=device, dtype="float32",
                               tiling=False, slicing=False), info)
    sound_models = _sound_models(job, info, model, device)
    data = readers.LatentDataset(output, s3_endpoint=endpoint)
    order = sorted(range(len(data)), key=lambda i: data[i]["clip_id"])[:n]  # a stable sample
    target = out or storage.join(output, "preview")
    results = []
    for i in order:
        row = data[i]
        latents = row["latents_mean"] if job.latent_mode == "dist" else row["latents"]
        recon = reconstruct(vae, info, latents.numpy(), job.latent_mode)
        original = original_clip(row, job)
        f = min(original.shape[1], recon.shape[1])
        score = psnr(original[:, :f], recon[:, :f])
        png = io.BytesIO()
        Image.fromarray(_strip(original, recon)).save(png, format="PNG")
        _put(storage.join(target, f"{row['clip_id']}.png"), png.getvalue(), endpoint)
        side_by_side = np.concatenate([original[:, :f], recon[:, :f]], axis=3).transpose(1, 2, 3, 0)
        with tempfile.TemporaryDirectory() as tmp:
            mp4 = samples.write_video(os.path.join(tmp, "v.mp4"), np.ascontiguousarray(side_by_side),
                                      fps=max(1, round(row["fps"] or 24)))
            with open(mp4, "rb") as fh:
                _put(storage.join(target, f"{row['clip_id']}.mp4"), fh.read(), endpoint)
        if sound_models and row.get(AUDIO_LATENTS) is not None:
            from pipeline.audio import decode_audio, wav_bytes

            audio_vae, vocoder = sound_models
            sound = decode_audio(row[AUDIO_LATENTS], audio_vae, vocoder)
            _put(storage.join(target, f"{row['clip_id']}.wav"),
                 wav_bytes(sound, vocoder.config.output_sampling_rate), endpoint)
        results.append({"clip_id": row["clip_id"], "source_uri": row["source_uri"],
                        "start_frame": row["start_frame"], "psnr_db": round(score, 3)})
    lines = ["clip_id,source_uri,start_frame,psnr_db"] + [
        f"{r['clip_id']},\"{r['source_uri']}\",{r['start_frame']},{r['psnr_db']}" for r in results]
    _put(storage.join(target, "psnr.csv"), ("\n".join(lines) + "\n").encode(), endpoint)
    return results


def preview_command(output, model, n, out, s3_endpoint, device) -> int:
    results = preview(output, model, n, out, s3_endpoint, device)
    for r in results:
        print(f"{r['psnr_db']:>8.2f} dB  {r['clip_id']}  {r['source_uri']} @ {r['start_frame']}")
    if results:
        print(f"mean PSNR {np.mean([r['psnr_db'] for r in results]):.2f} dB over {len(results)} clips; "
              f"strips, mp4s and psnr.csv in {out or storage.join(output, 'preview')}")
    return 0
