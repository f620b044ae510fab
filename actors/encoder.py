"""The VAE actor: one model replica per actor, loaded once; each call only encodes.

Clips arrive as uint8 [B, 3, F, H, W]; the float conversion to [-1, 1] and the cast to the
compute dtype happen on the device. Latents leave as [B, T, C, h, w] in the storage dtype,
normalised as the model's config says (see ``pipeline.model.ModelInfo.normalization``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings

import numpy as np

from pipeline import sink
from pipeline.config import Config
from pipeline.model import ModelInfo, local_model_dir

log = logging.getLogger(__name__)

MAX_TASK_RETRIES = 5
# Test-only fault hook: when this env var names a file that exists, the next actor call deletes
# it and kills its process, as a GPU fault or an OOM kill would.
CRASH_HOOK_ENV = "VIDEO_LATENTS_TEST_CRASH_FILE"


def load_vae(cfg: Config, info: ModelInfo):
    """The VAE through diffusers' ``from_pretrained``, the class named by its config."""
    import diffusers
    import torch

    cls = getattr(diffusers, info.class_name)
    # safetensors only, unless the user vouches for pickle weights (which can run code).
    vae = cls.from_pretrained(local_model_dir(cfg.model, cfg.s3_endpoint),
                              subfolder=info.subfolder, torch_dtype=getattr(torch, cfg.dtype),
                              use_safetensors=None if cfg.allow_pickle else True)
    if cfg.tiling:
        vae.enable_tiling()
    if cfg.slicing:
        vae.enable_slicing()
    return vae.to(cfg.device).eval().requires_grad_(False)


def _maybe_crash() -> None:
    path = os.environ.get(CRASH_HOOK_ENV)
    if path:
        try:
            os.unlink(path)  # whoever deletes it crashes: exactly once per arming
        except FileNotFoundError:
            return
        os._exit(1)


def clip_seed(seed: int, clip_id: str) -> int:
    """The sampling seed of one clip: independent of batch composition, so reruns match."""
    digest = hashlib.blake2b(f"{seed}:{clip_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class VAEEncoder:
    """Ray Data callable class for ``map_batches``: frames in, latents out."""

    @staticmethod
    def ray_options(cfg: Config) -> dict:
        """What each actor reserves (Ray places, and the autoscaler provisions, by these) and how
        it recovers: a dead actor is restarted and its batch retried, a few times at most, so a
        batch that kills every actor ends the run instead of looping forever."""
        return {"num_gpus": cfg.gpus_per_actor if cfg.device == "cuda" else 0, "num_cpus": 1,
                "max_restarts": -1, "max_task_retries": MAX_TASK_RETRIES}

    def __init__(self, cfg: Config, info: ModelInfo):
        import torch

        self.torch = torch
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        self.latent_dtype = getattr(torch, cfg.latent_dtype)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        else:
            # Ray pins a 1-CPU actor to one thread; encoding is then the bottleneck by far, and
            # the decode tasks are light beside it, so let torch use the node's cores.
            torch.set_num_threads(os.cpu_count() or 1)
        self.vae = load_vae(cfg, info)
        self.scale = info.scaling_factor
        self.shift = info.shift_factor
        self.mean, self.std = self._channel_stats(info)
        self.latent_shape = info.latent_shape(cfg.num_frames, cfg.height, cfg.width)

    def _to_device(self, frames: np.ndarray):
        torch = self.torch
        with warnings.catch_warnings():  # Ray hands read-only arrays; we never write into x
            warnings.filterwarnings("ignore", message=".*not writable.*")
            x = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        # uint8 -> [-1, 1] in float32 first (as the reference does), then the compute dtype.
        return x.to(torch.float32).div_(127.5).sub_(1.0).to(self.dtype)

    def _channel_stats(self, info: ModelInfo):
        """Per-channel latents_mean/std as [1, C, 1, 1, 1] float32 tensors (None when absent)."""
        torch = self.torch
        if info.stats_in_weights:
            pairs = (self.vae.latents_mean, self.vae.latents_std)
        else:
            pairs = (info.latents_mean, info.latents_std)
        return tuple(None if v is None else
                     torch.as_tensor(v, dtype=torch.float32, device=self.device).view(1, -1, 1, 1, 1)
                     for v in pairs)

    def _normalize(self, z):
        """(z - shift - mean) * scale / std, in float32, as the family's pipelines apply it."""
        z = z.float()
        if self.shift is not None:
            z = z - self.shift
        if self.mean is not None:
            z = z - self.mean
        z = z * self.scale
        return z / self.std if self.std is not None else z

    def encode(self, frames: np.ndarray, clip_ids) -> dict:
        """uint8 [B,3,F,H,W] -> {column: array [B,T,C,h,w]} for the configured latent mode."""
        torch = self.torch
        with torch.inference_mode():
            dist = self.vae.encode(self._to_device(frames)).latent_dist
            if self.cfg.latent_mode == "dist":
                out = {"latents_mean": dist.mean, "latents_logvar": dist.logvar}
            elif self.cfg.latent_mode == "sample":
                gens = [torch.Generator("cpu").manual_seed(clip_seed(self.cfg.seed, c)) for c in clip_ids]
                out = {"latents": self._normalize(dist.sample(generator=gens))}
            else:
                out = {"latents": self._normalize(dist.mode())}
            # [B,C,T,h,w] -> [B,T,C,h,w], made contiguous so Arrow stores a plain tensor.
            return {k: v.permute(0, 2, 1, 3, 4).to(self.latent_dtype).contiguous().cpu().numpy()
                    for k, v in out.items()}

    def _encode_each(self, frames, clip_ids, source_uris, errors) -> tuple[list[int], dict]:
        """After a batch failed: encode clip by clip so one bad clip costs only itself."""
        kept, parts = [], []
        for i, cid in enumerate(clip_ids):
            try:
                parts.append(self.encode(frames[i:i + 1], [cid]))
                kept.append(i)
            except Exception as e:  # noqa: BLE001 - becomes this clip's error row
                errors.append(sink.error_row(source_uris[i], "encode", type(e).__name__, str(e), cid))
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
        return kept, merged

    def __call__(self, batch: dict) -> dict:
        _maybe_crash()
        frames, clip_ids, uris = batch["frames"], list(batch["clip_id"]), list(batch["source_uri"])
        errors: list[dict] = []
        try:
            latents, kept = self.encode(frames, clip_ids), list(range(len(clip_ids)))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory on a large batch
            log.warning("batch of %d failed to encode (%s); retrying clip by clip", len(clip_ids), e)
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()
            kept, latents = self._encode_each(frames, clip_ids, uris, errors)
        kept, latents = self._drop_non_finite(kept, latents, clip_ids, uris, errors)
        if errors:
            sink.write_errors(self.cfg, errors)
        out = {name: np.asarray(batch[name])[kept] for name in sink.passthrough_columns(batch)}
        if not kept:  # every clip failed: empty columns of the usual shape keep one schema
            empty = np.zeros((0, *self.latent_shape), dtype=self.cfg.latent_dtype)
            latents = {k: empty for k in sink.tensor_columns(self.cfg.latent_mode)}
        return {**out, **latents}

    @staticmethod
    def _drop_non_finite(kept, latents, clip_ids, uris, errors):
        if not kept:
            return kept, latents
        finite = np.logical_and.reduce(
            [np.isfinite(a).reshape(len(a), -1).all(axis=1) for a in latents.values()])
        for j in np.flatnonzero(~finite):
            i = kept[j]
            errors.append(sink.error_row(uris[i], "encode", "NonFinite",
                                         "the VAE produced NaN or infinite latents", clip_ids[i]))
        return [i for i, ok in zip(kept, finite) if ok], {k: v[finite] for k, v in latents.items()}
