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

from actors.ledger import ANSWER_TIMEOUT_S
from pipeline import failures, hooks, sink, stats
from pipeline.config import AUDIO_PLAN_FPS, GPU_MAX_BATCH, GPU_MEMORY_HEADROOM, Config, data_batch_size, memory_format
from pipeline.model import ModelInfo, fetch_folder, local_model_dir
from pipeline.schema import AUDIO, AUDIO_LATENTS, AUDIO_RATE, IMAGE_PREFIX, RESOURCE, image_columns, tensor_columns

log = logging.getLogger(__name__)

MAX_TASK_RETRIES = 5


def load_vae(cfg: Config, info: ModelInfo, device: str | None = None):
    """The VAE through diffusers' ``from_pretrained``, the class named by its config."""
    import diffusers
    import torch

    cls = getattr(diffusers, info.class_name)
    # safetensors only, unless the user vouches for pickle weights (which can run code).
    # A hub id is loaded at the commit the driver resolved and recorded, whatever its branch says now.
    vae = cls.from_pretrained(local_model_dir(info, cfg.s3), revision=info.revision,
                              subfolder=info.subfolder, torch_dtype=getattr(torch, cfg.dtype),
                              use_safetensors=None if cfg.allow_pickle else True)
    if cfg.tiling:
        vae.enable_tiling()
    if cfg.slicing or info.one_clip_per_call:
        vae.enable_slicing()
    keep_input_precision(vae, getattr(torch, cfg.dtype))
    return vae.to(device or cfg.device).eval().requires_grad_(False)


def keep_input_precision(vae, dtype) -> list:
    """Mochi's encoder begins with Fourier features: sin and cos of the pixels times up to
    2**7 * 2 pi (about 804). diffusers' ``FourierFeatures`` computes them in float32, but from its
    input, and a bfloat16 input (8 significant bits) is off there by up to about 1.6 rad: the
    features are noise and the latents 0.68 away from float32's (relative L2; the first GPU run,
    bench/results/gpu-h200-2026-12-04.json; 0.89 on the CPU). So, when the VAE computes in less
    than float32, its input stays float32 (the encoder reads ``vae.input_dtype``) and the
    features are cast to the compute dtype after they are made; then bfloat16 is as close as
    the other families' (0.021 on the CPU). Returns the hooks' handles (none without such a layer)."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_mochi import FourierFeatures

    layers = [m for m in vae.modules() if isinstance(m, FourierFeatures)]
    vae.input_dtype = torch.float32 if layers else dtype
    return [layer.register_forward_hook(lambda _m, _inputs, out: out.to(dtype)) for layer in layers]


def load_audio_vae(cfg: Config, info: ModelInfo, device: str | None = None):
    """LTX-2's audio VAE (``audio_vae/`` beside the video VAE), in float32 whatever --dtype: the
    trainer encodes audio in float32 (process_videos.py:520, "needs float32 for quality"), and
    the model is small beside the video VAE."""
    import diffusers
    import torch

    audio = info.audio
    folder = fetch_folder(info.source, audio.subfolder, audio.files, cfg.s3)
    vae = getattr(diffusers, audio.class_name).from_pretrained(
        folder, revision=info.revision, subfolder=audio.subfolder, torch_dtype=torch.float32,
        use_safetensors=None if cfg.allow_pickle else True)
    return vae.to(device or cfg.device).eval().requires_grad_(False)


def clip_seed(seed: int, clip_id: str) -> int:
    """The sampling seed of one clip: independent of batch composition, so reruns match."""
    digest = hashlib.blake2b(f"{seed}:{clip_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class VAEEncoder:
    """Ray Data callable class for ``map_batches``: frames in, latents out.

    Failures by class (``pipeline.failures``): a clip whose latents are not finite gets a final
    error row; out of memory is met by splitting the batch, then clip by clip, then the VAE's
    tiling, and a clip that still does not fit gets a retryable row; anything else is the
    model's or the device's fault, never a clip's: the actor reports it to the run's ledger and
    ends its process, so Ray restarts it and retries the batch (a CUDA context cannot be trusted
    after such an error). The run stops when the restarted process meets the same cause before
    it completes a batch (the ledger counts them), or once a batch's retries are spent.
    """

    @staticmethod
    def ray_options(cfg: Config) -> dict:
        """What each actor reserves (Ray places, and the autoscaler provisions, by these) and how
        it recovers: a dead actor is restarted and its batch retried, a few times at most, so a
        batch that kills every actor ends the run instead of looping forever."""
        gpus = cfg.gpus_per_actor * (1 - cfg.text_share if cfg.text_embeddings else 1)  # text: actors.text
        options = {"num_gpus": gpus if cfg.device == "cuda" else 0, "num_cpus": 1,
                   "max_restarts": -1, "max_task_retries": MAX_TASK_RETRIES}
        if cfg.device == "cpu":
            options["runtime_env"] = {"env_vars": {"GLIBC_TUNABLES": one_malloc_arena()}}
        return options

    def __init__(self, cfg: Config, info: ModelInfo, ledger=None):
        import torch

        hooks.reach("encoder-start")
        self.torch = torch
        self.cfg = cfg
        self.ledger = ledger  # None outside a run (tests, benchmarks): failures raise instead
        self.actor_id = None  # in a run: this actor's Ray id, which its restarts keep
        self.device = torch.device(hooks.compute_device(cfg.device))
        self.dtype = getattr(torch, cfg.dtype)
        self.latent_dtype = getattr(torch, cfg.latent_dtype)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        else:
            torch.set_num_threads(cpu_threads(cfg))
            keep_freed_memory()
        if ledger is not None:
            import ray

            ray.get(ledger.register.remote(ray.get_runtime_context().current_actor))
            self.actor_id = ray.get_runtime_context().get_actor_id()
        try:
            self.vae = load_vae(cfg, info, str(self.device))
        except Exception as e:  # noqa: BLE001 - the model, not any input: the run must stop
            self._report_systemic("loading the model", e)
            raise
        self.audio = info.audio if cfg.audio_latents else None
        if self.audio is not None:
            try:
                self.audio_vae = load_audio_vae(cfg, info, str(self.device))
            except Exception as e:  # noqa: BLE001 - the model, not any input: the run must stop
                self._report_systemic("loading the audio model", e)
                raise
        self.channels_last = memory_format(cfg, self.device.type) == "channels_last_3d"
        if self.channels_last:
            for module in self.vae.modules():
                if isinstance(module, torch.nn.Conv3d):
                    module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
        self.scale = info.scaling_factor
        self.invert_image_scale = bool(info.config.get("invert_scale_latents"))
        self.shift = info.shift_factor
        self.mean, self.std = self._channel_stats(info)
        self.latent_shape = info.latent_shape(cfg.num_frames, cfg.height, cfg.width)
        self.chunk = data_batch_size(cfg)
        if cfg.batch_size is None and self.device.type == "cuda":
            self.chunk = self._fit_batch()
        log.info("encoder actor: %d clip(s) per VAE call on %s%s", self.chunk, self.device,
                 f", {torch.get_num_threads()} torch threads" if self.device.type == "cpu" else "")

    def _to_device(self, frames: np.ndarray):
        torch = self.torch
        with warnings.catch_warnings():  # Ray hands read-only arrays; we never write into x
            warnings.filterwarnings("ignore", message=".*not writable.*")
            x = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        # uint8 -> [-1, 1] in float32 first (as the reference does), then the compute dtype.
        x = x.to(torch.float32).div_(127.5).sub_(1.0).to(self.vae.input_dtype)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def _fit_batch(self) -> int:
        """The largest batch (a power of two, up to GPU_MAX_BATCH) whose encode peaks under this
        actor's share of the GPU's memory less GPU_MEMORY_HEADROOM (``batch_memory_budget``):
        tried once, on blank clips of the largest shape."""
        torch = self.torch
        free, total = torch.cuda.mem_get_info(self.device)
        budget = batch_memory_budget(total, free, torch.cuda.memory_reserved(self.device),
                                     device_share(self.ray_options(self.cfg)["num_gpus"]))
        height, width = max(self.cfg.buckets or ((self.cfg.height, self.cfg.width),), key=lambda b: b[0] * b[1])
        best, size = 1, 1
        while size <= GPU_MAX_BATCH:
            blank = np.zeros((size, 3, self.cfg.num_frames, height, width), dtype=np.uint8)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                self.encode(blank, [f"fit-{i}" for i in range(size)])
            except Exception as e:  # noqa: BLE001 - out of memory ends the search; anything else is real
                if not failures.is_out_of_memory(e):
                    self._report_systemic("encoding (sizing the batch)", e)
                    raise
                break
            finally:
                torch.cuda.empty_cache()
            if torch.cuda.max_memory_allocated(self.device) > budget:
                break
            best, size = size, size * 2
        return best

    def _channel_stats(self, info: ModelInfo):
        """Per-channel latents_mean/std as [1, C, 1, 1, 1] float32 tensors (None when absent)."""
        torch = self.torch
        return tuple(None if v is None else
                     torch.as_tensor(v, dtype=torch.float32, device=self.device).view(1, -1, 1, 1, 1)
                     for v in info.channel_stats(self.vae))

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
        """uint8 [B,3,F,H,W] -> {column: array [B,T,C,h,w]} for the configured latent mode; with
        --image-latents also each clip's first frame encoded alone (``image_*`` columns, T = 1)."""
        with self.torch.inference_mode():
            x = self._to_device(frames)
            out = self._latents(x, clip_ids, self._normalize)
            if self.cfg.image_latents:
                first = x[:, :, :1].contiguous(memory_format=self.torch.channels_last_3d) if self.channels_last \
                    else x[:, :, :1]
                image = self._latents(first, [f"{c}#image" for c in clip_ids], self._normalize_image)
                out.update({IMAGE_PREFIX + k: v for k, v in image.items()})
            # [B,C,T,h,w] -> [B,T,C,h,w], made contiguous so Arrow stores a plain tensor.
            return {k: v.permute(0, 2, 1, 3, 4).to(self.latent_dtype).contiguous().cpu().numpy()
                    for k, v in out.items()}

    def _latents(self, x, seeds, normalize) -> dict:
        dist = self.vae.encode(x).latent_dist
        if self.cfg.latent_mode == "dist":
            return {"latents_mean": dist.mean, "latents_logvar": dist.logvar}
        if self.cfg.latent_mode == "sample":
            gens = [self.torch.Generator("cpu").manual_seed(clip_seed(self.cfg.seed, c)) for c in seeds]
            return {"latents": normalize(dist.sample(generator=gens))}
        return {"latents": normalize(dist.mode())}

    def encode_audio(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        """float32 PCM [B, 2, n] at ``rate`` Hz -> normalised audio latents [B, C, L, M] in the
        storage dtype: resampled to the VAE's rate and the log-mel computed on the device
        (pipeline.audio.resample, log_mel), the posterior's mode (the trainer's, whatever
        --latent-mode), LTX2Pipeline._normalize_audio_latents."""
        from pipeline import audio

        torch = self.torch
        with torch.inference_mode():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not writable.*")
                x = torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32)).to(self.device)
            x = audio.resample(x, int(rate), self.audio.sample_rate)
            z = self.audio_vae.encode(audio.log_mel(x, self.audio)).latent_dist.mode()
            return audio.normalize(z.float(), self.audio_vae).to(self.latent_dtype).contiguous().cpu().numpy()

    def _add_audio(self, batch: dict, encoded: dict) -> None:
        """Each encoded clip's audio latents, beside its video's (clips of one rate and length
        together)."""
        pcm, rates = batch[AUDIO], np.asarray(batch[AUDIO_RATE])
        groups: dict[tuple, list[int]] = {}
        for i in sorted(encoded):
            groups.setdefault((int(rates[i]), pcm[i].shape), []).append(i)
        for (rate, _), idx in groups.items():
            clips = np.stack([pcm[i] for i in idx])
            try:
                out = self.encode_audio(clips, rate)
            except Exception as e:  # noqa: BLE001 - the model or the device, never a clip's sound
                if not self._report_systemic("encoding audio", e, self.actor_id):
                    os._exit(1)
                raise failures.SystemicFailure(f"{type(e).__name__}: {e}") from e
            for j, i in enumerate(idx):
                encoded[i][0][AUDIO_LATENTS] = out[j]

    def _normalize_image(self, z):
        """As the family's image-to-video pipeline prepares its image latents: CogVideoX 1.5's
        (``invert_scale_latents``) divides by the scaling factor; the others normalise as video."""
        if self.invert_image_scale:
            return z.float() / self.scale
        return self._normalize(z)

    def _encode_fitting(self, clips: np.ndarray, idx: list[int], clip_ids, uris, errors,
                        tiled: bool = False, pad: bool = True) -> dict:
        """Encode clips of one shape; out of memory, split the batch in halves down to single
        clips, then try a clip with the VAE's tiling. Returns {batch index: (columns, tiled)}.

        A lone clip is encoded beside a copy of itself (its result discarded) when the actor's
        batch size is above one: oneDNN takes other kernels for a batch of one than for any larger
        batch, and with them the last bits of the latents differ, while all larger batches agree
        (measured). So a clip's bytes do not depend on how Ray Data happened to batch it (the end
        of the input, a retry, a rerun). The out-of-memory halves are not padded."""
        try:
            out = self._encode_or_stop(clips, [clip_ids[i] for i in idx], pad)
            return {i: ({k: v[j] for k, v in out.items()}, tiled or self.cfg.tiling)
                    for j, i in enumerate(idx)}
        except Exception as e:  # noqa: BLE001 - out of memory is met below; the rest goes on up
            if not failures.is_out_of_memory(e):
                raise
            log.warning("out of memory on %d clip(s)%s (%s)", len(idx), " tiled" if tiled else "", e)
            self._free_memory()
        if len(idx) > 1:
            half = len(idx) // 2
            return {**self._encode_fitting(clips[:half], idx[:half], clip_ids, uris, errors, tiled, pad=False),
                    **self._encode_fitting(clips[half:], idx[half:], clip_ids, uris, errors, tiled, pad=False)}
        if not tiled and not self.cfg.tiling and hasattr(self.vae, "enable_tiling"):
            self.vae.enable_tiling()
            try:
                return self._encode_fitting(clips, idx, clip_ids, uris, errors, tiled=True, pad=False)
            finally:
                self.vae.disable_tiling()
        i = idx[0]
        errors.append(sink.error_row(
            uris[i], "encode", "OutOfMemory", "the clip alone does not fit in the device's memory"
            + (", even with the VAE's tiling" if hasattr(self.vae, "enable_tiling") else ""),
            clip_ids[i], error_class=RESOURCE, retryable=True))
        return {}

    def _encode_or_stop(self, clips: np.ndarray, ids: list[str], pad: bool = False) -> dict:
        """Encode (a lone clip padded, see _encode_fitting), letting out-of-memory
        through; any other failure is systemic."""
        n = len(ids)
        if pad and n == 1 and self.chunk > 1 and not getattr(self.vae, "use_slicing", False):
            clips, ids = np.concatenate([clips, clips]), [ids[0], ids[0]]
        try:
            return {k: v[:n] for k, v in self.encode(clips, ids).items()}
        except Exception as e:  # noqa: BLE001 - classified right here
            if failures.is_out_of_memory(e):
                raise
            if not self._report_systemic("encoding", e, self.actor_id):
                os._exit(1)  # Ray restarts the actor on a fresh process and retries the batch
            # This actor's process before this one met this error too, with no batch done in
            # between (or this is outside a run): retrying cannot help. Ray does not retry an
            # actor task's exception, so the dataset fails and the run stops.
            raise failures.SystemicFailure(f"{type(e).__name__}: {e}") from e

    def _report_systemic(self, doing: str, e: BaseException, actor: str | None = None) -> bool:
        """Tell the run's ledger; True when the run should stop now rather than restart ``actor``
        (see RunLedger.systemic), as always outside a run, where nothing would restart it. A
        ledger that does not answer leaves the batch to Ray's retries, which are capped."""
        cause = failures.systemic_cause(doing, e)
        log.error("systemic failure while %s", cause)
        if self.ledger is None:
            return True
        import ray

        try:
            final = failures.first_line(e) if getattr(e, "stops_run", False) else None
            return bool(ray.get(self.ledger.systemic.remote(cause, actor, final), timeout=ANSWER_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - the failure being reported is the one that matters
            log.exception("the run's ledger did not take the cause")
            return False

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def __call__(self, batch: dict) -> dict:
        hooks.reach("encode")
        frames, clip_ids, uris = batch["frames"], list(batch["clip_id"]), list(batch["source_uri"])
        errors: list[dict] = []
        encoded: dict[int, tuple[dict, bool]] = {}
        for group in _same_shape_groups(frames):  # with --buckets a batch may mix shapes
            for start in range(0, len(group), self.chunk):
                idx = group[start:start + self.chunk]
                clips = frames[idx] if frames.dtype != object else np.stack([frames[i] for i in idx])
                encoded.update(self._encode_fitting(clips, idx, clip_ids, uris, errors))
        if self.audio is not None:
            self._add_audio(batch, encoded)
        for i, (columns, _) in list(encoded.items()):
            if not all(np.isfinite(v).all() for v in columns.values()):
                del encoded[i]
                e = failures.NonFinite("the VAE produced NaN or infinite latents for this clip")
                errors.append(sink.error_row(uris[i], "encode", "NonFinite", str(e), clip_ids[i]))
        for row in errors:
            sink.write_error(self.cfg, row)
        kept = sorted(encoded)
        moments = None
        if self.cfg.latent_mode != "dist":  # the stored values, after the storage cast; per shape (--buckets)
            for value in (encoded[i][0]["latents"] for i in kept):
                moments = stats.merge(moments, stats.moments(value[None]))
        self._report(len(encoded), [f"encode/{row['error_type']}" for row in errors], moments)
        out = {name: np.asarray(batch[name])[kept] for name in sink.passthrough_columns(batch)}
        out["tiled"] = np.array([encoded[i][1] for i in kept], dtype=bool)
        shapes = {name: self.latent_shape for name in tensor_columns(self.cfg.latent_mode)}
        if self.cfg.image_latents:  # one latent frame
            shapes.update({name: (1, *self.latent_shape[1:]) for name in image_columns(self.cfg.latent_mode)})
        if self.audio is not None:
            shapes[AUDIO_LATENTS] = self.audio.latent_shape(self.cfg.num_frames, self.cfg.fps or AUDIO_PLAN_FPS)
        for name, shape in shapes.items():
            out[name] = _stack([encoded[i][0][name] for i in kept],
                               empty=np.zeros((0, *shape), dtype=self.cfg.latent_dtype))
        return out

    def _report(self, ok: int, failed_as: list[str], moments: dict | None = None) -> None:
        if self.ledger is None:
            return
        import ray

        stop = ray.get(self.ledger.clip_outcomes.remote(ok, failed_as, moments, self.actor_id))
        if stop:
            raise failures.GuardTripped(stop)


def device_share(num_gpus: float) -> float:
    """The share of its device an actor that reserved ``num_gpus`` holds: Ray packs fractional
    actors onto one GPU (--gpus-per-actor 0.5: two VAE actors; --text-embeddings: the VAE actor
    1 - --text-gpus of its slot, the text actor the rest), and an actor with one or more whole
    GPUs computes on the first, alone."""
    return min(1.0, num_gpus) if num_gpus > 0 else 1.0


def batch_memory_budget(total: int, free: int, held: int, share: float) -> float:
    """Bytes an encode may peak at (torch's max_memory_allocated, the model's weights included)
    in the batch search: this actor's ``share`` of the device's ``total``, and never more than
    what this process can have now (the device's ``free`` bytes plus those its own allocator
    ``held``s), less GPU_MEMORY_HEADROOM. Sized against the whole device, a VAE actor that holds
    0.75 of a GPU could take batches that fill it, leaving the text actor beside it (or a second
    VAE actor) out of memory."""
    return (1 - GPU_MEMORY_HEADROOM) * min(total * share, free + held)


def cpu_threads(cfg: Config) -> int:
    """torch's threads in a CPU encoder actor (VAE or text): --cpu-threads, else the CPUs Ray
    counts on this node (``ray start --num-cpus``, or the container's CPU limit, where
    ``os.cpu_count()`` sees the host's cores), at most the CPUs this process may run on.

    Ray pins a 1-CPU actor to one thread; encoding is the bottleneck by far and the decode tasks
    are light beside it, so torch uses the node's CPUs. oneDNN splits its work by thread count,
    and the latents' last bits depend on it (measured, BENCHMARKS.md): nodes of other sizes give
    other bits unless --cpu-threads pins it."""
    if cfg.cpu_threads:
        return cfg.cpu_threads
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import ray

        if ray.is_initialized():
            here = ray.get_runtime_context().get_node_id()
            counted = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == here), 0)
            if counted >= 1:
                return min(usable, int(counted))
    except Exception:  # noqa: BLE001 - Ray could not say: the CPUs this process may use
        pass
    return usable


# glibc malloc settings for the CPU encoder's process (mallopt parameter numbers from malloc.h).
# By default glibc hands each large activation back to the kernel when torch frees it, and
# takes it again, page-faulted and zeroed, for the next layer: a third of the CPU encode's time
# went to the kernel. Growing the heap 1 GiB at a time, keeping freed memory up to 2 GiB and
# serving blocks up to glibc's 32 MiB cap from the heap encode the same bytes 1.5x faster at
# 17x128x192 and 1.7x at 17x256x384, for about 20% more peak memory (BENCHMARKS.md). The effect
# of PyTorch's advice to preload jemalloc or tcmalloc, without a library to install.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TOP_PAD, 1 << 30), (_M_TRIM_THRESHOLD, (2 << 30) - 1))


def one_malloc_arena() -> str:
    """GLIBC_TUNABLES for the CPU encoder's process (with any the driver has): one malloc arena.

    Ray Data calls the actor from a thread of its own, whose allocations glibc serves from a
    separate arena of 64 MiB heaps; those hand freed activations back to the kernel whatever
    keep_freed_memory sets, and the encode spent 0.1 s per call in the kernel against 0.01 s
    in the main thread. One arena keeps every thread on the main heap. The arena limit is read
    once, at the first thread's first allocation, so it must be in the environment the process
    starts with; a C library other than glibc ignores it."""
    ours = "glibc.malloc.arena_max=1"
    theirs = os.environ.get("GLIBC_TUNABLES")
    return f"{theirs}:{ours}" if theirs else ours


def keep_freed_memory() -> bool:
    """Apply MALLOC_SETTINGS to this process; False where the C library is not glibc (macOS,
    musl), which is then left as it is."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS)


def _same_shape_groups(frames) -> list[list[int]]:
    """Batch indices grouped by clip shape, in first-seen order (one group without --buckets)."""
    if frames.dtype != object:
        return [list(range(len(frames)))]
    groups: dict[tuple, list[int]] = {}
    for i, clip in enumerate(frames):
        groups.setdefault(clip.shape, []).append(i)
    return list(groups.values())


def _stack(arrays: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    """One [B, ...] array when the shapes agree, else an object array Ray stores as ragged."""
    if not arrays:
        return empty
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    ragged = np.empty(len(arrays), dtype=object)
    ragged[:] = arrays
    return ragged
