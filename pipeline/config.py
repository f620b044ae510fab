"""The whole job's settings: one frozen dataclass, validated before Ray starts."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from pipeline import storage
from pipeline.model import ModelError, ModelInfo, inspect_model

DEFAULT_EXTENSIONS = ("mp4", "mov", "mkv", "webm", "avi")
RESIZE_MODES = ("crop", "stretch")
LATENT_MODES = ("mode", "sample", "dist")
DTYPES = ("float32", "float16", "bfloat16")
LATENT_DTYPES = ("float16", "float32")
DEVICES = ("auto", "cuda", "cpu")


class ConfigError(ValueError):
    """A bad option or combination: one line saying what to change (exit code 2)."""


@dataclass(frozen=True)
class Config:
    input: str
    output: str
    model: str
    subfolder: str | None = None
    num_frames: int = 49
    height: int = 480
    width: int = 720
    resize: str = "crop"
    clip_stride: int | None = None  # None: num_frames (back-to-back clips)
    max_clips: int | None = None
    latent_mode: str = "mode"
    seed: int = 0
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    latent_dtype: str = "float16"
    batch_size: int = 1
    num_actors: tuple[int, int] | None = None  # None: decided from the cluster's GPUs
    gpus_per_actor: float = 1.0
    device: str = "auto"
    tiling: bool = False
    slicing: bool = False
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    s3_endpoint: str | None = None
    overwrite: bool = False

    @property
    def stride(self) -> int:
        return self.clip_stride or self.num_frames

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_options(cfg: Config) -> None:
    _check(cfg.resize in RESIZE_MODES, f"--resize must be one of {'|'.join(RESIZE_MODES)}")
    _check(cfg.latent_mode in LATENT_MODES, f"--latent-mode must be one of {'|'.join(LATENT_MODES)}")
    _check(cfg.device in DEVICES, f"--device must be one of {'|'.join(DEVICES)}")
    _check(cfg.dtype is None or cfg.dtype in DTYPES, f"--dtype must be one of {'|'.join(DTYPES)}")
    _check(cfg.latent_dtype in LATENT_DTYPES,
           f"--latent-dtype must be one of {'|'.join(LATENT_DTYPES)}")
    _check(cfg.num_frames >= 1, "--num-frames must be at least 1")
    _check(cfg.height >= 1 and cfg.width >= 1, "--height and --width must be positive")
    _check(cfg.clip_stride is None or cfg.clip_stride >= 1, "--clip-stride must be at least 1")
    _check(cfg.max_clips is None or cfg.max_clips >= 1, "--max-clips must be at least 1")
    _check(cfg.batch_size >= 1, "--batch-size must be at least 1")
    _check(cfg.gpus_per_actor > 0, "--gpus-per-actor must be positive (fractions like 0.5 are allowed)")
    _check(cfg.gpus_per_actor <= 1 or float(cfg.gpus_per_actor).is_integer(),
           "--gpus-per-actor above 1 must be a whole number")
    if cfg.num_actors is not None:
        lo, hi = cfg.num_actors
        _check(1 <= lo <= hi, "--num-actors takes MIN[,MAX] with 1 <= MIN <= MAX")
    _check(cfg.device != "cpu" or cfg.dtype != "float16",
           "--dtype float16 is not supported on --device cpu (use float32 or bfloat16)")
    _check(len(cfg.extensions) > 0, "--extensions must name at least one extension")
    _check(storage.is_s3(cfg.output) or not os.path.isfile(cfg.output),
           f"OUTPUT {cfg.output} is a file; give a folder or an s3:// prefix")
    _check(_norm(cfg.input) != _norm(cfg.output), "OUTPUT must differ from INPUT")


def _norm(uri: str) -> str:
    return uri.rstrip("/") if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def _check_shapes(cfg: Config, info: ModelInfo) -> None:
    problem = info.check_num_frames(cfg.num_frames)
    _check(problem is None, problem or "")
    r = info.spatial_ratio
    _check(cfg.height % r == 0 and cfg.width % r == 0,
           f"--height {cfg.height} and --width {cfg.width} must be multiples of {r}, "
           f"the spatial compression of {info.class_name}")


def validate(cfg: Config) -> tuple[Config, ModelInfo]:
    """Check every option, the input and the model; return the config to run and the model info."""
    _check_options(cfg)
    try:
        _check(storage.exists(cfg.input, cfg.s3_endpoint), f"INPUT {cfg.input} does not exist")
    except OSError as e:
        raise ConfigError(f"INPUT {cfg.input} cannot be read: {_first_line(e)}") from None
    try:
        info = inspect_model(cfg.model, cfg.subfolder, cfg.s3_endpoint)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    _check_shapes(cfg, info)
    _check_output(cfg)
    return cfg.replace(subfolder=info.subfolder), info


def _check_output(cfg: Config) -> None:
    from pipeline import sink

    try:
        existing = sink.existing_output(cfg)
    except OSError as e:
        raise ConfigError(f"OUTPUT {cfg.output} cannot be read: {_first_line(e)}") from None
    _check(cfg.overwrite or not existing,
           f"OUTPUT {cfg.output} already holds {', '.join(existing)}; pass --overwrite to replace it")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
