"""The whole job's settings: one frozen dataclass, validated before Ray starts."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from pipeline import failures, storage
from pipeline.model import ModelError, ModelInfo, inspect_model

DEFAULT_EXTENSIONS = ("mp4", "mov", "mkv", "webm", "avi")
RESIZE_MODES = ("crop", "stretch")
LATENT_MODES = ("mode", "sample", "dist")
DTYPES = ("float32", "float16", "bfloat16")
LATENT_DTYPES = ("float16", "float32")
DEVICES = ("auto", "cuda", "cpu")
MEMORY_FORMATS = ("auto", "channels_last_3d", "contiguous")
DEFAULT_CAPTION_COLUMN = "caption"


def redact_url(url: str | None) -> str | None:
    """``scheme://user:secret@host`` -> ``scheme://***@host``."""
    if not url or "@" not in url:
        return url
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


class ConfigError(ValueError):
    """A bad option or combination: one line saying what to change (exit code 2)."""


DEFAULT_TEXT_GPUS = 0.25  # --text-gpus of the T5 families (pipeline.text.RECIPES has each family's)

@dataclass(frozen=True)
class Config:
    input: str | None  # None with --manifest
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
    batch_size: int | None = None  # None (auto): CPU_BATCH on cpu; on cuda the largest that fits, found by the actor
    memory_format: str = "auto"  # auto: channels_last_3d on cpu (measured faster), contiguous on cuda
    rows_per_file: int | None = None  # None: about TARGET_FILE_BYTES of latents per file
    decode_cpus: float = 1.0  # CPUs per decode task, and FFmpeg threads in it
    cpu_threads: int | None = None  # torch threads of a CPU encoder actor; None: the node's CPUs as Ray counts them
    clips_per_task: int = 64  # a longer video is split into parts decoded by separate tasks; 0: never
    num_actors: tuple[int, int] | None = None  # None: decided from the cluster's GPUs
    gpus_per_actor: float = 1.0
    device: str = "auto"
    cluster_config: str | None = None  # the autoscaler's config, for the pool's maximum
    tiling: bool = False
    slicing: bool = False
    # Prompt embeddings, computed by a text encoder actor pool after the VAE (pipeline.text).
    text_embeddings: bool = False
    text_encoder: str | None = None  # folder with text_encoder/ and tokenizer/ (default: --model)
    # The manifest's caption column; None: `caption` when the manifest has one. Empty cells (and
    # inputs without a manifest) take the .txt beside the video.
    caption_column: str | None = None
    text_max_length: int | None = None  # None: the family pipeline's default
    # Of each encoder slot's --gpus-per-actor, given to its text encoder actor; None: the family's
    # (pipeline.text.RECIPES: 0.25 for the T5 families, 0.5 for LTX-2 and the HunyuanVideos), set by
    # validate once the text encoder is known.
    text_gpus: float | None = None
    # LTX-2: each clip's audio encoded by the model's audio_vae/ (pipeline.audio); the audio VAE's
    # rate, set by validate (the PCM crosses at the source's rate and is resampled to it).
    audio_latents: bool = False
    audio_sample_rate: int | None = None
    image_latents: bool = False  # the first frame of each clip encoded alone, as image-to-video conditioning
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    s3_endpoint: str | None = None
    s3_max_attempts: int = storage.S3_MAX_ATTEMPTS  # per S3 request, with backoff
    overwrite: bool = False
    allow_version_change: bool = False  # resume OUTPUT under another diffusers/torch major.minor (pipeline.job)
    retry_errors: bool = False  # also retry inputs whose errors are final (after a decoder upgrade)
    # Stop the run (exit 1) once MIN_OUTCOMES_FOR_GUARD inputs (or clips) have an outcome and more
    # than this share of them failed: a broken job must not burn a cluster. 1 turns it off.
    max_error_rate: float = 0.5
    # Limits on untrusted inputs, checked before decoding where the container tells.
    max_pixels: int = 4096 * 4096
    max_duration: float = 4 * 3600.0  # seconds of video
    max_bytes: int = 32 << 30
    decode_timeout: float = 1800.0  # seconds of decoding per video
    allow_pickle: bool = False
    force: bool = False  # allow OUTPUT inside INPUT
    fps: float | None = None  # resample in time before cutting clips
    # Clips cut within shots only (pipeline.scenes): a shot's clips start at its first frame.
    split_scenes: bool = False
    scene_threshold: float = 2.4  # pipeline.scenes.DEFAULT_THRESHOLD: a score over its neighbours' mean
    min_shot_frames: int = 15  # pipeline.scenes.DEFAULT_MIN_SHOT
    buckets: tuple[tuple[int, int], ...] = ()  # (height, width) sizes; each video takes the nearest aspect
    manifest: str | None = None  # CSV, JSONL or Parquet with a `uri` column
    # The manifest's own columns (name, Arrow type), copied into the output rows: set by validate.
    extra_columns: tuple[tuple[str, str], ...] = ()
    # The job's identity digest (pipeline.job), set by the run once recorded in OUTPUT; written
    # into every file's metadata.
    job_fingerprint: str | None = None

    @property
    def s3(self) -> storage.S3Options:
        return storage.S3Options(self.s3_endpoint, self.s3_max_attempts)

    @property
    def caption_field(self) -> str:
        """The manifest column captions are read from."""
        return self.caption_column or DEFAULT_CAPTION_COLUMN

    @property
    def stride(self) -> int:
        return self.clip_stride or self.num_frames

    def to_dict(self) -> dict:
        """For ``_SUCCESS`` and logs: credentials in an endpoint URL are masked."""
        d = dataclasses.asdict(self)
        d["s3_endpoint"] = redact_url(self.s3_endpoint)
        return d

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    @property
    def text_share(self) -> float:
        """--text-gpus as the run uses it: validate sets the family's default; a config that did
        not go through validate gets the T5 families'."""
        return DEFAULT_TEXT_GPUS if self.text_gpus is None else self.text_gpus


# --batch-size auto. On CPU: the best in the pipeline's sweep (BENCHMARKS.md). On CUDA, Ray Data
# hands actors batches of up to GPU_MAX_BATCH clips, and each actor encodes them in chunks of the
# largest size that fits in its share of its GPU's memory (its fraction of the GPU, as Ray
# reserved it) with GPU_MEMORY_HEADROOM to spare, found at start.
CPU_BATCH = 2
GPU_MAX_BATCH = 8
GPU_MEMORY_HEADROOM = 0.2


def memory_format(cfg: Config, device_type: str) -> str:
    """The VAE's tensors' layout on ``device_type``: --memory-format, or auto's pick."""
    if cfg.memory_format != "auto":
        return cfg.memory_format
    # On CPU, oneDNN's 3-D convolutions run 1.2x faster channels-last (BENCHMARKS.md); on CUDA
    # contiguous: channels_last_3d ran at 0.65x its clips/s on an H200 (BENCHMARKS.md, GPU section).
    return "channels_last_3d" if device_type == "cpu" else "contiguous"


def data_batch_size(cfg: Config) -> int:
    """Clips per batch Ray Data hands an encoder actor."""
    return cfg.batch_size or (GPU_MAX_BATCH if cfg.device == "cuda" else CPU_BATCH)


# Output files of about this many bytes of latents: few enough files for fast listing, resume and
# training readers, small enough that a killed run loses little; read in row groups of about
# ROW_GROUP_BYTES, so a streaming reader holds one group, not a file.
TARGET_FILE_BYTES = 256 << 20
ROW_GROUP_BYTES = 32 << 20


AUDIO_PLAN_FPS = 24.0  # the frame rate an estimate of audio latents assumes without --fps


def latent_bytes_per_row(cfg: Config, info: ModelInfo, fps: float | None = None,
                         audio_rate: int | None = None) -> int:
    """Bytes of tensors in one output row (the largest bucket's, with --buckets). With
    --audio-latents, a clip's audio spans num_frames / fps seconds: ``fps`` is the video's own
    rate (plan knows it), else --fps, else AUDIO_PLAN_FPS; it is cut at ``audio_rate`` (the
    stream's, from its header: plan knows it too), else at the audio VAE's, then resampled."""
    sizes = cfg.buckets or ((cfg.height, cfg.width),)
    itemsize = 2 if cfg.latent_dtype == "float16" else 4
    tensors = 2 if cfg.latent_mode == "dist" else 1
    most = max(math.prod(info.latent_shape(cfg.num_frames, h, w)) for h, w in sizes)
    if cfg.image_latents:  # one more latent frame per tensor
        most += max(math.prod(info.latent_shape(1, h, w)) for h, w in sizes)
    if cfg.audio_latents and info.audio:
        most += math.prod(info.audio.latent_shape(cfg.num_frames, cfg.fps or fps or AUDIO_PLAN_FPS, audio_rate))
    text = info.text.bytes_per_row(itemsize) if cfg.text_embeddings and info.text else 0
    return most * itemsize * tensors + text


def rows_per_file(cfg: Config, info: ModelInfo) -> int:
    return cfg.rows_per_file or max(1, TARGET_FILE_BYTES // latent_bytes_per_row(cfg, info))


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
    _check(cfg.batch_size is None or cfg.batch_size >= 1, "--batch-size must be at least 1 (or auto)")
    _check(cfg.memory_format in MEMORY_FORMATS, f"--memory-format must be one of {'|'.join(MEMORY_FORMATS)}")
    _check(cfg.text_gpus is None or 0 < cfg.text_gpus < 1,
           "--text-gpus must be a fraction between 0 and 1 of each encoder slot")
    _check(cfg.text_max_length is None or cfg.text_max_length >= 1, "--text-max-length must be at least 1")
    _check(cfg.text_encoder is None or cfg.text_embeddings, "--text-encoder needs --text-embeddings")
    _check(cfg.caption_column is None or (cfg.text_embeddings and cfg.manifest),
           "--caption-column names the --manifest column that holds the captions: it needs --manifest "
           "and --text-embeddings (without a manifest, each video's caption is the .txt beside it)")
    _check(cfg.rows_per_file is None or cfg.rows_per_file >= 1, "--rows-per-file must be at least 1")
    _check(cfg.decode_cpus > 0, "--decode-cpus must be positive")
    _check(cfg.cpu_threads is None or cfg.cpu_threads >= 1, "--cpu-threads must be at least 1")
    _check(cfg.clips_per_task >= 0, "--clips-per-task must be 0 (never split) or more")
    _check(cfg.gpus_per_actor > 0, "--gpus-per-actor must be positive (fractions like 0.5 are allowed)")
    _check(cfg.gpus_per_actor <= 1 or float(cfg.gpus_per_actor).is_integer(),
           "--gpus-per-actor above 1 must be a whole number")
    if cfg.num_actors is not None:
        lo, hi = cfg.num_actors
        _check(1 <= lo <= hi, "--num-actors takes MIN[,MAX] with 1 <= MIN <= MAX")
    _check(cfg.device != "cpu" or cfg.dtype != "float16",
           "--dtype float16 is not supported on --device cpu (use float32 or bfloat16)")
    _check(len(cfg.extensions) > 0, "--extensions must name at least one extension")
    _check(cfg.max_pixels >= 1, "--max-pixels must be positive")
    _check(cfg.max_duration > 0, "--max-duration must be positive")
    _check(cfg.max_bytes >= 1, "--max-bytes must be positive")
    _check(cfg.decode_timeout > 0, "--decode-timeout must be positive")
    _check(cfg.s3_max_attempts >= 1, "--s3-max-attempts must be at least 1")
    _check(0 <= cfg.max_error_rate <= 1, "--max-error-rate must be between 0 and 1 (1 turns the guard off)")
    _check(storage.is_s3(cfg.output) or not os.path.isfile(cfg.output),
           f"OUTPUT {cfg.output} is a file; give a folder or an s3:// prefix")
    _check(cfg.fps is None or cfg.fps > 0, "--fps must be positive")
    _check(cfg.scene_threshold > 0, "--scene-threshold must be positive (a frame's content score over its neighbours' mean)")
    _check(cfg.min_shot_frames >= 1, "--min-shot-frames must be at least 1")
    _check((cfg.input is None) != (cfg.manifest is None), "give INPUT or --manifest, not both"
           if cfg.input else "give INPUT (a folder, a file or an s3:// prefix) or --manifest")
    if cfg.input is not None:
        _check(_norm(cfg.input) != _norm(cfg.output), "OUTPUT must differ from INPUT")
        _check(cfg.force or not _norm(cfg.output).startswith(_norm(cfg.input) + "/"),
               "OUTPUT is inside INPUT, so a later run would list its own output; "
               "choose another OUTPUT or pass --force")


def _norm(uri: str) -> str:
    return uri.rstrip("/") if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def _check_shapes(cfg: Config, info: ModelInfo) -> None:
    problem = info.check_num_frames(cfg.num_frames)
    _check(problem is None, problem or "")
    r = info.spatial_ratio
    _check(cfg.height % r == 0 and cfg.width % r == 0,
           f"--height {cfg.height} and --width {cfg.width} must be multiples of {r}, "
           f"the spatial compression of {info.class_name}")
    for h, w in cfg.buckets:
        _check(h % r == 0 and w % r == 0 and h > 0 and w > 0,
               f"--buckets {h}x{w}: both sides must be positive multiples of {r}, "
               f"the spatial compression of {info.class_name}")


def validate(cfg: Config) -> tuple[Config, ModelInfo]:
    """Check every option, the input and the model; return the config to run and the model info."""
    _check_options(cfg)
    if cfg.cluster_config:
        from pipeline.cluster import read_cluster_config

        try:
            read_cluster_config(cfg.cluster_config)
        except ValueError as e:
            raise ConfigError(f"--cluster-config {cfg.cluster_config}: {e}") from None
    if cfg.manifest:
        from pipeline import sources

        try:
            cfg = cfg.replace(extra_columns=sources.manifest_extra_columns(cfg))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--manifest {cfg.manifest}: {failures.first_line(e)}") from None
    else:
        try:
            _check(storage.exists(cfg.input, cfg.s3), f"INPUT {cfg.input} does not exist")
        except OSError as e:
            raise ConfigError(f"INPUT {cfg.input} cannot be read: {failures.first_line(e)}") from None
    try:
        info = inspect_model(cfg.model, cfg.subfolder, cfg.s3)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    _check_shapes(cfg, info)
    _check(cfg.allow_pickle or info.weights_format != "pickle",
           f"--model: {cfg.model} has only pickle weights (.bin/.pt), which can run code when "
           "loaded; convert them to safetensors, or pass --allow-pickle if you trust the source")
    if cfg.text_embeddings:
        from pipeline.text import TextError, inspect_text

        try:
            info = dataclasses.replace(info, text=inspect_text(cfg, info.class_name))
        except (TextError, OSError) as e:
            raise ConfigError(failures.first_line(e)) from None
        if cfg.text_gpus is None:
            cfg = cfg.replace(text_gpus=info.text.default_gpus)
    if cfg.audio_latents:
        from pipeline.audio import inspect_audio

        try:
            info = dataclasses.replace(info, audio=inspect_audio(cfg.model, cfg.s3))
        except (ModelError, OSError) as e:
            raise ConfigError(failures.first_line(e)) from None
        cfg = cfg.replace(audio_sample_rate=info.audio.sample_rate)
    _check_output(cfg)
    return cfg.replace(subfolder=info.subfolder), info


def _check_output(cfg: Config) -> None:
    try:
        storage.exists(cfg.output, cfg.s3)
    except OSError as e:
        raise ConfigError(f"OUTPUT {cfg.output} cannot be reached: {failures.first_line(e)}") from None
