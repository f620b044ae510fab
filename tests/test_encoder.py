import os
import platform
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from actors.encoder import VAEEncoder, clip_seed
from pipeline import samples
from pipeline.config import Config
from pipeline.model import inspect_model
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH, reference_latents


def make_encoder(tiny_vae, tmp_path, **kw) -> VAEEncoder:
    kw = {"batch_size": 8, **kw}  # one VAE call per test batch, unless a test asks otherwise
    cfg = Config(input=str(tmp_path), output=str(tmp_path / "out"), model=tiny_vae,
                 num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, device="cpu", dtype="float32",
                 latent_dtype="float32", num_actors=(1, 1), **kw)
    return VAEEncoder(cfg, inspect_model(tiny_vae))


def batch_of(n: int, seed: int = 0) -> dict:
    clips = [samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH, seed=seed + i) for i in range(n)]
    return {
        "frames": np.stack([c.transpose(3, 0, 1, 2) for c in clips]),  # [B,3,F,H,W]
        "clip_id": np.array([f"clip{seed + i}" for i in range(n)], dtype=object),
        "source_uri": np.array([f"file{seed + i}.mp4" for i in range(n)], dtype=object),
        "clip_index": np.zeros(n, np.int32), "start_frame": np.zeros(n, np.int32),
        "num_frames": np.full(n, NUM_FRAMES, np.int32), "fps": np.full(n, 24.0),
        "height": np.full(n, HEIGHT, np.int32), "width": np.full(n, WIDTH, np.int32),
    }, clips


def test_mode_equals_the_direct_diffusers_computation(tiny_vae, tmp_path):
    enc = make_encoder(tiny_vae, tmp_path)
    batch, clips = batch_of(3)
    out = enc(batch)
    assert "frames" not in out  # pixels do not travel on to the writer
    assert out["latents"].shape == (3, 3, 4, HEIGHT // 8, WIDTH // 8)  # [B,T,C,h,w]
    assert out["latents"].dtype == np.float32 and out["latents"].flags.c_contiguous
    for got, frames in zip(out["latents"], clips):
        np.testing.assert_allclose(got, reference_latents(tiny_vae, frames), rtol=1e-4, atol=1e-5)
    assert list(out["clip_id"]) == ["clip0", "clip1", "clip2"]


def test_scaling_factor_comes_from_the_config(tmp_path):
    model = samples.make_tiny_vae(str(tmp_path / "m"), scaling_factor=2.0)
    base = samples.make_tiny_vae(str(tmp_path / "b"), scaling_factor=1.0)
    batch, _ = batch_of(1)
    scaled = make_encoder(model, tmp_path)(batch)["latents"]
    plain = make_encoder(base, tmp_path)(batch)["latents"]
    np.testing.assert_allclose(scaled, 2.0 * plain, rtol=1e-5, atol=1e-6)


def test_sample_mode_is_seeded_per_clip_independent_of_batching(tiny_vae, tmp_path):
    enc = make_encoder(tiny_vae, tmp_path, latent_mode="sample", seed=7)
    batch, _ = batch_of(3)
    together = enc(batch)["latents"]
    alone = enc({k: v[1:2] for k, v in batch.items()})["latents"][0]
    # Same noise; only float rounding differs between batch sizes (a wrong seed differs by ~1).
    np.testing.assert_allclose(together[1], alone, rtol=1e-4, atol=1e-5)
    mode = make_encoder(tiny_vae, tmp_path)(batch)["latents"]
    assert not np.allclose(together, mode)  # noise was really added
    other_seed = make_encoder(tiny_vae, tmp_path, latent_mode="sample", seed=8)(batch)["latents"]
    assert not np.allclose(together, other_seed)
    assert clip_seed(7, "a") == clip_seed(7, "a") != clip_seed(7, "b")


def test_dist_mode_stores_unscaled_mean_and_logvar(tiny_vae, tmp_path):
    batch, clips = batch_of(1)
    out = make_encoder(tiny_vae, tmp_path, latent_mode="dist")(batch)
    assert "latents" not in out
    scale = inspect_model(tiny_vae).scaling_factor
    np.testing.assert_allclose(out["latents_mean"][0] * scale, reference_latents(tiny_vae, clips[0]),
                               rtol=1e-4, atol=1e-5)
    assert out["latents_logvar"].shape == out["latents_mean"].shape


def _vae_with_limited_memory(enc, fits) -> list:
    """Make the encoder's real VAE raise CUDA's out-of-memory error unless ``fits(x, vae)``, as a
    small GPU would; returns the batch sizes it was called with."""
    import torch

    real_encode, calls = enc.vae.encode, []

    def encode(x, *args, **kwargs):
        calls.append((x.shape[0], bool(enc.vae.use_tiling)))
        if not fits(x, enc.vae):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_encode(x, *args, **kwargs)

    enc.vae.encode = encode
    return calls


def test_out_of_memory_splits_the_batch_down_to_single_clips(tiny_vae, tmp_path):
    enc = make_encoder(tiny_vae, tmp_path)
    batch, clips = batch_of(3)
    calls = _vae_with_limited_memory(enc, lambda x, vae: x.shape[0] == 1)
    out = enc(batch)
    assert calls[0] == (3, False) and calls[1:3] == [(1, False), (2, False)]  # halves, then halves again
    assert list(out["clip_id"]) == ["clip0", "clip1", "clip2"] and not out["tiled"].any()
    for got, frames in zip(out["latents"], clips):
        np.testing.assert_allclose(got, reference_latents(tiny_vae, frames), rtol=1e-4, atol=1e-5)
    assert not os.path.exists(tmp_path / "out" / "errors")


def test_batch_size_auto_on_cpu_encodes_in_chunks_of_the_swept_best(tiny_vae, tmp_path):
    from pipeline.config import CPU_BATCH

    enc = make_encoder(tiny_vae, tmp_path, batch_size=None)
    calls = _vae_with_limited_memory(enc, lambda x, vae: True)
    batch, clips = batch_of(3)
    out = enc(batch)
    assert [n for n, _ in calls] == [CPU_BATCH, 2]  # the lone last clip beside a copy of itself
    for got, frames in zip(out["latents"], clips):
        np.testing.assert_allclose(got, reference_latents(tiny_vae, frames), rtol=1e-4, atol=1e-5)


def test_a_clips_latents_do_not_depend_on_how_it_was_batched(tiny_vae, tmp_path):
    """Ray Data may hand a clip over alone (the end of the input, a retry) or beside any other: its
    stored bytes must be the same. (Unpadded, a batch of one takes other kernels: the last bits
    differ.)"""
    enc = make_encoder(tiny_vae, tmp_path, batch_size=None)
    batch, _ = batch_of(3)
    together = enc(batch)["latents"]
    for i in range(3):
        alone = enc({k: v[i:i + 1] for k, v in batch.items()})["latents"][0]
        assert np.array_equal(alone, together[i]), i
    pair = enc({k: v[1:3] for k, v in batch.items()})["latents"]
    assert np.array_equal(pair, together[1:3])


def test_out_of_memory_alone_then_tiling_then_a_retryable_error_row(tiny_vae, tmp_path):
    enc = make_encoder(tiny_vae, tmp_path)
    batch, _ = batch_of(2)
    _vae_with_limited_memory(enc, lambda x, vae: vae.use_tiling)
    out = enc(batch)
    assert list(out["clip_id"]) == ["clip0", "clip1"] and out["tiled"].all()  # the row says how it was made
    assert not enc.vae.use_tiling  # tiling was a fallback for those clips only

    enc = make_encoder(tiny_vae, tmp_path)
    _vae_with_limited_memory(enc, lambda x, vae: False)
    out = enc(batch)
    assert len(out["clip_id"]) == 0 and out["latents"].shape == (0, 3, 4, HEIGHT // 8, WIDTH // 8)
    rows = sorted(pq.read_table(os.path.join(tmp_path, "out", "errors")).to_pylist(), key=lambda r: r["clip_id"])
    assert [(r["clip_id"], r["error_type"], r["error_class"], r["retryable"]) for r in rows] == [
        ("clip0", "OutOfMemory", "resource", True), ("clip1", "OutOfMemory", "resource", True)]
    assert "even with the VAE's tiling" in rows[0]["message"]


def test_a_model_that_fails_is_systemic_not_the_clips_fault(tmp_path):
    """A VAE built for 4 input channels fails on every RGB clip: that is the model's fault, so no
    clip gets an error row; outside a run the encoder raises (in a run its actor restarts, and
    the run stops when the restarted one meets the same error before it completes a batch)."""
    from pipeline.failures import SystemicFailure

    model = samples.make_tiny_vae(str(tmp_path / "m4"), in_channels=4)
    enc = make_encoder(model, tmp_path)
    with pytest.raises(SystemicFailure, match="channels"):
        enc(batch_of(2)[0])
    assert not os.path.exists(tmp_path / "out" / "errors")


def test_non_finite_latents_are_the_clips_fault(tiny_vae, tmp_path):
    enc = make_encoder(tiny_vae, tmp_path)
    real_encode = enc.encode

    def encode_with_a_nan(frames, clip_ids):
        out = real_encode(frames, clip_ids)
        for j, cid in enumerate(clip_ids):
            if cid == "clip1":
                out["latents"][j] = np.nan
        return out

    enc.encode = encode_with_a_nan
    out = enc(batch_of(3)[0])
    assert list(out["clip_id"]) == ["clip0", "clip2"]
    (row,) = pq.read_table(os.path.join(tmp_path, "out", "errors")).to_pylist()
    assert (row["clip_id"], row["error_type"], row["error_class"], row["retryable"]) == \
        ("clip1", "NonFinite", "input", False)


@pytest.mark.parametrize("latent_dtype", ["float16", "float32"])
def test_storage_dtype(tiny_vae, tmp_path, latent_dtype):
    enc = make_encoder(tiny_vae, tmp_path)
    enc.latent_dtype = getattr(enc.torch, latent_dtype)
    assert enc(batch_of(1)[0])["latents"].dtype == np.dtype(latent_dtype)


ALLOCATOR_SCRIPT = r'''
import hashlib, sys
import numpy as np
import actors.encoder as E
from pipeline.config import Config
from pipeline.model import inspect_model
model, folder, tuned = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
applied = E.keep_freed_memory() if tuned else False
if not tuned:
    E.keep_freed_memory = lambda: False  # the actor's own call, off
cfg = Config(input=folder, output=folder + "/out", model=model, num_frames=9, height=96, width=128,
             device="cpu", dtype="float32", latent_dtype="float32", num_actors=(1, 1), batch_size=2)
enc = E.VAEEncoder(cfg, inspect_model(model))
frames = np.random.default_rng(0).integers(0, 256, (2, 3, 9, 96, 128), dtype=np.uint8)
latents = [enc.encode(frames, ["a", "b"])["latents"] for _ in range(2)]
print(applied, hashlib.sha256(b"".join(z.tobytes() for z in latents)).hexdigest())
'''


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's mallopt: Linux only")
def test_the_cpu_allocator_settings_change_no_latent_bit(tiny_vae, tmp_path):
    """keep_freed_memory (the CPU actor's glibc settings) is applied, and the same clips give
    the same bytes with it as without (each in its own process: the settings are per process)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [subprocess.run([sys.executable, "-c", ALLOCATOR_SCRIPT, tiny_vae, str(tmp_path), tuned],
                           capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
            for tuned in ("1", "0")]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    (applied, tuned_hash), (_, plain_hash) = (r.stdout.split()[-2:] for r in runs)
    assert applied == "True"
    assert tuned_hash == plain_hash


THREADS_SCRIPT = r'''
import json, ray
from actors.encoder import cpu_threads
from pipeline.config import Config
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
cfg = Config(input="i", output="o", model="m", device="cpu")
counted = ray.get(ray.remote(num_cpus=1)(lambda: cpu_threads(cfg)).remote())
pinned = ray.get(ray.remote(num_cpus=1)(lambda: cpu_threads(cfg.replace(cpu_threads=3))).remote())
ray.shutdown()
print(json.dumps([counted, pinned]))
'''


def test_cpu_actors_take_their_threads_from_the_cpus_ray_counts_on_the_node_or_the_option(tmp_path):
    """A node started with one CPU (``ray start --num-cpus 1``, or a container limited to one)
    gets one torch thread, whatever the host's core count; --cpu-threads overrides."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": root, "RAY_ADDRESS": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[1, 3]"


def test_the_encoder_actor_sets_torchs_threads_to_cpu_threads(tiny_vae, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        make_encoder(tiny_vae, tmp_path, cpu_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _malloc_arenas() -> int:
    """glibc's malloc arenas in this process, from malloc_info's report."""
    import ctypes
    import tempfile

    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile("r") as report:
        fp = libc.fopen(report.name.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        return report.read().count("<heap nr=")


class _ArenaProbe:
    """Allocates on a thread of its own, as Ray Data calls an actor, and counts the arenas."""

    def arenas(self) -> int:
        import threading

        counted = []

        def allocate():
            blocks = [bytearray(1 << 20) for _ in range(4)]  # noqa: F841 - held while counting
            counted.append(_malloc_arenas())

        thread = threading.Thread(target=allocate)
        thread.start()
        thread.join()
        return counted[0]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_cpu_encoder_actors_process_keeps_one_malloc_arena(ray_local):
    """The CPU actor's options start its process with one glibc arena, so the thread Ray Data
    encodes on allocates from the main heap that keep_freed_memory tunes; a CUDA actor's
    process keeps glibc's default (one arena per thread, up to 8 per core)."""
    counts = {}
    for device in ("cpu", "cuda"):
        options = VAEEncoder.ray_options(Config(input="i", output="o", model="m", device=device))
        probe = ray_local.remote(num_cpus=0, runtime_env=options.get("runtime_env"))(_ArenaProbe).remote()
        counts[device] = ray_local.get(probe.arenas.remote())
        ray_local.kill(probe)
    assert counts["cpu"] == 1
    assert counts["cuda"] > 1
