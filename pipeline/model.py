"""Finding a VAE and reading what the job needs from its config, without importing torch.

The shapes (temporal/spatial compression, latent channels) and the normalisation
(scaling_factor, shift_factor, latents_mean/std) all come from the model's own config and
class; nothing here is a number copied from a model card.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

from pipeline import storage
from pipeline.failures import SystemicFailure

CONFIG_NAME = "config.json"
VAE_SUBFOLDER = "vae"


class ModelError(ValueError):
    """The model cannot be found or is not a supported video VAE."""


class ModelChanged(SystemicFailure):
    """A model file on S3 is not the one the run fingerprinted when it started: its weights were
    replaced (or deleted) under the run. No restart mends it; the run stops, naming the file."""

    stops_run = True

    def __init__(self, source: str, name: str, expected: str, now: str | None):
        super().__init__(
            f"the model at {source} changed during the run ({name}: ETag {expected} when the run "
            f"started, {now or 'deleted'} now); what this run wrote so far is from the weights it "
            "started with: rerun with --overwrite (or into a new OUTPUT) to encode with the new ones")


@dataclass(frozen=True)
class ModelInfo:
    source: str  # as given by the user
    subfolder: str | None
    class_name: str
    temporal_ratio: int
    spatial_ratio: int
    latent_channels: int
    scaling_factor: float  # 1.0 where the family's config has none
    shift_factor: float | None
    config: dict
    weights_format: str = "unknown"  # safetensors | pickle | unknown (hub models)
    latents_mean: tuple | None = None  # per channel, from the config
    latents_std: tuple | None = None
    stats_in_weights: bool = False  # mean/std are buffers in the weights (LTX-Video)
    # Per file of the VAE's folder: (name, bytes, content key): the ETag on S3, a blake2b of the
    # bytes on a local disk; empty for a hub id. Part of the job's identity and the cache key.
    files: tuple = ()
    # A hub id's commit, resolved once by the driver (None for a folder or S3, or when it could not
    # be resolved): recorded in the job's identity, and what every actor loads.
    revision: str | None = None
    text: object = None  # pipeline.text.TextInfo with --text-embeddings
    audio: object = None  # pipeline.audio.AudioInfo with --audio-latents
    # The VAE encodes one clip per call (diffusers' slicing), whatever the batch: HunyuanVideo 1.5's
    # mid-block attention builds its causal mask for a batch of one (diffusers 0.42.1,
    # autoencoder_kl_hunyuanvideo15.py:150-154: a [B, S, S] mask against [B, 1, S, C] queries).
    one_clip_per_call: bool = False

    @property
    def has_statistics(self) -> bool:
        """Per-channel latents_mean/std normalise this family's latents (Mochi, LTX-Video, Wan)."""
        return self.latents_mean is not None or self.stats_in_weights

    def check_num_frames(self, num_frames: int) -> str | None:
        """An error message when ``num_frames`` is not k * temporal_ratio + 1, else None."""
        r = self.temporal_ratio
        if num_frames < 1 or (num_frames - 1) % r:
            ok = ", ".join(str(k * r + 1) for k in (1, 2, 4, 8, 12))
            return (f"--num-frames {num_frames} does not fit {self.class_name}: it needs "
                    f"k*{r}+1 frames (e.g. {ok})")
        return None

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[T, C, h, w] of one clip's latents."""
        return ((num_frames - 1) // self.temporal_ratio + 1, self.latent_channels,
                height // self.spatial_ratio, width // self.spatial_ratio)

    def channel_stats(self, vae) -> tuple:
        """(latents_mean, latents_std) per channel, or None each: from the loaded model's
        buffers where the family keeps them in its weights (LTX-Video), else from its config."""
        if self.stats_in_weights:
            return vae.latents_mean, vae.latents_std
        return self.latents_mean, self.latents_std

    def normalization(self) -> dict:
        """What is applied to the raw latent z, as the family's diffusers pipelines do:
        (z - shift_factor - latents_mean) * scaling_factor / latents_std, per channel."""
        out = {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
               "latents_mean": list(self.latents_mean) if self.latents_mean else None,
               "latents_std": list(self.latents_std) if self.latents_std else None,
               "formula": "(z - shift_factor - latents_mean) * scaling_factor / latents_std"}
        if self.stats_in_weights:
            out["latents_mean"] = out["latents_std"] = "model buffers latents_mean/latents_std"
        if "invert_scale_latents" in self.config:  # CogVideoX 1.5: image conditioning depends on it
            out["invert_scale_latents"] = bool(self.config["invert_scale_latents"])
        return out


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _ltx2_ratios(c: dict) -> dict:
    """LTX-2's compression from its config: the ratios where the config names them, else from the
    encoder's blocks as LTX2VideoEncoder3d builds them (the patch size, then a factor 2 per block
    with spatio_temporal_scaling, in space or time as its downsample_type says). diffusers' own
    fallback (patch_size * 2 ** sum(spatio_temporal_scaling), in both axes) does not count the
    downsample types, and disagrees with the encoder's output for a config without the ratios."""
    blocks = len(c["layers_per_block"]) - 1
    scaling = c["spatio_temporal_scaling"]
    scaling = (scaling,) * blocks if isinstance(scaling, bool) else scaling
    kinds = [kind for kind, on in zip(c["downsample_type"], scaling) if on]
    spatial = int(c["patch_size"]) * 2 ** sum(k in ("spatial", "spatiotemporal", "conv") for k in kinds)
    temporal = int(c["patch_size_t"]) * 2 ** sum(k in ("temporal", "spatiotemporal", "conv") for k in kinds)
    return {"spatial_ratio": int(c.get("spatial_compression_ratio") or spatial),
            "temporal_ratio": int(c.get("temporal_compression_ratio") or temporal)}


# class name -> its compression ratios, channels and normalisation statistics, read from its
# config the way diffusers' own pipelines for that family read them.
FAMILIES = {
    "AutoencoderKLCogVideoX": lambda c: {
        "temporal_ratio": int(c["temporal_compression_ratio"]),
        "spatial_ratio": 2 ** (len(c["block_out_channels"]) - 1),
        "latent_channels": int(c["latent_channels"]),
    },
    "AutoencoderKLHunyuanVideo": lambda c: {
        "temporal_ratio": int(c["temporal_compression_ratio"]),
        "spatial_ratio": int(c["spatial_compression_ratio"]),
        "latent_channels": int(c["latent_channels"]),
    },
    "AutoencoderKLWan": lambda c: {  # Wan 2.1 and 2.2
        "temporal_ratio": int(c["scale_factor_temporal"]),
        "spatial_ratio": int(c["scale_factor_spatial"]),
        "latent_channels": int(c["z_dim"]),
    },
    "AutoencoderKLLTXVideo": lambda c: {
        "temporal_ratio": int(c.get("temporal_compression_ratio")
                              or c["patch_size_t"] * 2 ** sum(c["spatio_temporal_scaling"])),
        "spatial_ratio": int(c.get("spatial_compression_ratio")
                             or c["patch_size"] * 2 ** sum(c["spatio_temporal_scaling"])),
        "latent_channels": int(c["latent_channels"]),
        "stats_in_weights": True,
    },
    "AutoencoderKLHunyuanVideo15": lambda c: {  # HunyuanVideo15Pipeline: z * scaling_factor
        "temporal_ratio": int(c["temporal_compression_ratio"]),
        "spatial_ratio": int(c["spatial_compression_ratio"]),
        "latent_channels": int(c["latent_channels"]),
        "one_clip_per_call": True,
    },
    "AutoencoderKLLTX2Video": lambda c: {  # LTX2Pipeline._normalize_latents, stats in the weights
        **_ltx2_ratios(c),
        "latent_channels": int(c["latent_channels"]),
        "stats_in_weights": True,
    },
    "AutoencoderKLMochi": lambda c: {
        "temporal_ratio": _prod(c["temporal_expansions"]),
        "spatial_ratio": _prod(c["spatial_expansions"]),
        "latent_channels": int(c["latent_channels"]),
    },
}


def looks_like_hub_id(source: str) -> bool:
    return (not storage.is_s3(source) and not os.path.exists(os.path.expanduser(source))
            and source.count("/") == 1 and not source.startswith((".", "/", "~")))


def hub_revision(repo: str) -> str | None:
    """The commit a hub id's default branch points to, resolved as huggingface_hub resolves it for
    its downloads (``HfApi.resolve_revision``): asked of the Hub, else (HF_HUB_OFFLINE=1, no
    network, the Hub down) read from the local cache's ``refs/main``. No weights are downloaded.
    None when neither can say, or with a huggingface_hub too old to resolve revisions."""
    from huggingface_hub import HfApi  # a diffusers dependency

    if not hasattr(HfApi, "resolve_revision"):
        return None
    try:
        return HfApi().resolve_revision(repo).resolved
    except Exception:  # noqa: BLE001 - unreachable, unknown or not cached: recorded as unresolved
        return None


def _read_config_file(source: str, subfolder: str | None, endpoint: str | None,
                      revision: str | None = None) -> dict | None:
    if looks_like_hub_id(source):
        from huggingface_hub import hf_hub_download  # a diffusers dependency

        try:
            path = hf_hub_download(source, CONFIG_NAME, subfolder=subfolder, revision=revision)
        except Exception:  # noqa: BLE001 - any hub failure means "not there"
            return None
        with open(path) as f:
            return json.load(f)
    base = storage.join(source, subfolder) if subfolder else source
    uri = storage.join(base, CONFIG_NAME)
    try:
        return json.loads(storage.read_bytes(uri, endpoint))
    except (FileNotFoundError, OSError):
        return None


SAFE_WEIGHTS = (".safetensors",)
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _weights_format(files: tuple) -> str:
    """Which kind of weight files the model folder holds; hub models are checked at load."""
    names = [name for name, _, _ in files]
    if any(n.endswith(SAFE_WEIGHTS) for n in names):
        return "safetensors"
    return "pickle" if any(n.endswith(PICKLE_WEIGHTS) for n in names) else "unknown"


def folder_files(source: str, subfolder: str | None, s3, head_bytes: int | None = None) -> tuple:
    """(name, bytes, content key) for each file in a model's folder, sorted by name; empty for a
    hub id. ``head_bytes`` hashes only each file's first bytes (with its size): for text
    encoders of tens of GB, where a safetensors file's header names every tensor and offset."""
    if looks_like_hub_id(source):
        return ()
    import pyarrow.fs as pafs

    fs, path = storage.resolve(storage.join(source, subfolder) if subfolder else source, s3)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File]
    return tuple(sorted((i.base_name, int(i.size), _content_key(fs, i.path, head_bytes)) for i in infos))


def _content_key(fs, path: str, head_bytes: int | None = None) -> str:
    """The store's ETag on S3 (one HEAD, no download); a hash of the bytes on a local disk."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.S3FileSystem):
        with fs.open_input_file(path) as f:
            return "etag:" + f.metadata().get("ETag", b"").decode().strip('"')
    if head_bytes:
        with open(path, "rb") as f:
            return "blake2b-head:" + hashlib.blake2b(f.read(head_bytes), digest_size=16).hexdigest()
    return "blake2b:" + file_digest(path)


RACY_S = 2.0


def file_digest(path: str) -> str:
    """blake2b of every byte of a local file, read in chunks (about 1 GB/s on one core: a VAE in
    a second, a 20 GB text encoder in tens of seconds). Remembered in the node's cache under the
    file's path, size, inode, modification and change times, so a rerun does not read it again;
    a file rewritten in any way has a new change time (ctime, which no tool can set back). As git
    does, a file changed in the last RACY_S seconds is not remembered: a file system with coarse
    timestamps could give its next rewrite the same ones."""
    st = os.stat(path)
    stamp = f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_dev}:{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    memo = os.path.join(cache_root(), "digests", hashlib.sha256(stamp.encode()).hexdigest()[:32])
    try:
        with open(memo) as f:
            return f.read().strip()
    except OSError:
        pass
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    hexdigest = digest.hexdigest()
    if time.time() - st.st_ctime < RACY_S:
        return hexdigest
    try:  # best effort: a read-only cache only costs the next run another read
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        with open(memo + ".tmp", "w") as f:
            f.write(hexdigest)
        os.replace(memo + ".tmp", memo)
    except OSError:
        pass
    return hexdigest


def cache_root() -> str:
    return os.environ.get("VIDEO_LATENTS_CACHE", os.path.expanduser("~/.cache/video-latents"))


def inspect_model(source: str, subfolder: str | None = None, endpoint: str | None = None) -> ModelInfo:
    """Read the VAE's config; with no subfolder given, use ``vae/`` when the model has one."""
    candidates = [subfolder] if subfolder is not None else [VAE_SUBFOLDER, None]
    revision = hub_revision(source) if looks_like_hub_id(source) else None
    config, chosen = None, None
    for candidate in candidates:
        config = _read_config_file(source, candidate, endpoint, revision)
        if config is not None:
            chosen = candidate
            break
    if config is None:
        where = f"{source}/{subfolder}" if subfolder else source
        raise ModelError(f"--model: no {CONFIG_NAME} found at {where} (nor in its vae/ subfolder)")
    class_name = config.get("_class_name", "")
    if class_name not in FAMILIES:
        raise ModelError(f"--model: {class_name or 'unknown class'} is not a supported video VAE "
                         f"(supported: {', '.join(sorted(FAMILIES))})")
    stats = {k: tuple(config[k]) for k in ("latents_mean", "latents_std") if config.get(k) is not None}
    files = folder_files(source, chosen, endpoint)
    return ModelInfo(
        source=source,
        subfolder=chosen,
        class_name=class_name,
        scaling_factor=float(config.get("scaling_factor") or 1.0),
        shift_factor=config.get("shift_factor"),
        config=config,
        weights_format=_weights_format(files) if files else "unknown",
        files=files,
        revision=revision,
        **stats,
        **FAMILIES[class_name](config),
    )


def local_model_dir(info: ModelInfo, s3=None) -> str:
    """A path or hub id ``from_pretrained`` can load (with ``subfolder=info.subfolder``).

    An S3 model is fetched once per node into a cache shared by the node's actors, and only the
    VAE's folder (a diffusers repository's transformer and text encoder are many times its size).
    The cache is keyed by the VAE files' sizes and ETags, so new weights under the same URI are
    fetched again."""
    return fetch_folder(info.source, info.subfolder, info.files, s3)


def fetch_folder(source: str, subfolder: str | None, files: tuple, s3=None) -> str:
    """``source`` itself when local; for S3, a node-local copy of ``subfolder`` alone (the listed
    ``files``), made once per node under a file lock and keyed by the files' sizes and ETags.
    Each file is fetched as the ETag in ``files`` names it (If-Match), so weights replaced on S3
    since the driver fingerprinted them are refused (ModelChanged), never cached under the old key."""
    if not storage.is_s3(source):
        return os.path.expanduser(source)
    import filelock  # a huggingface_hub dependency

    key = hashlib.sha256(json.dumps([source, subfolder, files]).encode()).hexdigest()[:16]
    target = os.path.join(cache_root(), "models", key)
    done = os.path.join(target, ".complete")
    os.makedirs(cache_root(), exist_ok=True)
    with filelock.FileLock(target + ".lock"):
        if not os.path.exists(done):
            folder = storage.join(source, subfolder) if subfolder else source
            local = os.path.join(target, subfolder) if subfolder else target
            os.makedirs(local, exist_ok=True)
            for name, _, content_key in files:
                etag = content_key[len("etag:"):] if content_key.startswith("etag:") else None
                try:
                    storage.download(storage.join(folder, name), os.path.join(local, name), s3, etag or None)
                except storage.ObjectChanged as e:
                    raise ModelChanged(source, f"{subfolder}/{name}" if subfolder else name, e.expected,
                                       e.now) from None
            open(done, "w").close()
    return target
