import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from actors.encoder import VAEEncoder, clip_seed
from pipeline import samples
from pipeline.config import Config
from pipeline.model import inspect_model
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH, reference_latents


def make_encoder(tiny_vae, tmp_path, **kw) -> VAEEncoder:
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


def test_a_clip_that_fails_to_encode_becomes_an_error_row(tiny_vae, tmp_path):
    enc = make_encoder(tiny_vae, tmp_path)
    batch, _ = batch_of(3)
    real_encode = enc.encode

    def encode_failing_on_clip1(frames, clip_ids):
        if "clip1" in list(clip_ids):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_encode(frames, clip_ids)

    enc.encode = encode_failing_on_clip1
    out = enc(batch)
    assert list(out["clip_id"]) == ["clip0", "clip2"] and len(out["latents"]) == 2
    (row,) = pq.read_table(os.path.join(tmp_path, "out", "errors")).to_pylist()
    assert row == {"source_uri": "file1.mp4", "stage": "encode", "error_type": "RuntimeError",
                   "message": "CUDA out of memory (simulated)", "clip_id": "clip1"}


@pytest.mark.parametrize("latent_dtype", ["float16", "float32"])
def test_storage_dtype(tiny_vae, tmp_path, latent_dtype):
    enc = make_encoder(tiny_vae, tmp_path)
    enc.latent_dtype = getattr(enc.torch, latent_dtype)
    assert enc(batch_of(1)[0])["latents"].dtype == np.dtype(latent_dtype)
