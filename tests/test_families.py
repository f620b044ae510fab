"""Every supported VAE family, as a tiny random-weight instance of diffusers' own class, against a
direct diffusers computation normalised the way that family's diffusers pipelines do it."""
import json
import os

import numpy as np
import pytest
import torch

import diffusers
from actors.encoder import VAEEncoder
from pipeline import samples, sink
from pipeline.config import Config
from pipeline.model import FAMILIES, inspect_model

SIZE = 64


def _stats(n, offset):
    return [round(offset + 0.1 * i, 3) for i in range(n)]


# class -> (tiny config, frames per clip, how its pipelines normalise a raw latent z)
TINY = {
    "AutoencoderKLCogVideoX": (
        {**samples.TINY_COGVIDEOX, "scaling_factor": 0.7, "invert_scale_latents": True}, 9,
        lambda z, vae: z * vae.config.scaling_factor),
    "AutoencoderKLHunyuanVideo": (
        dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
             scaling_factor=0.5), 9,
        lambda z, vae: z * vae.config.scaling_factor),
    "AutoencoderKLWan": (  # pipeline_wan_i2v: (z - mean) * (1 / std)
        dict(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
             latents_mean=_stats(4, -0.2), latents_std=_stats(4, 0.8)), 9,
        lambda z, vae: (z - torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1))
        * (1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1))),
    "AutoencoderKLWan:2.2": (  # residual, patchified, 16x spatial
        dict(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
             temperal_downsample=[False, True, True], is_residual=True, patch_size=2, scale_factor_spatial=16,
             in_channels=12, out_channels=12, latents_mean=_stats(4, 0.1), latents_std=_stats(4, 0.9)), 9,
        lambda z, vae: (z - torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1))
        * (1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1))),
    "AutoencoderKLLTXVideo": (  # LTXPipeline._normalize_latents, with the model's buffers
        dict(block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8), latent_channels=8,
             layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
             spatio_temporal_scaling=(True, True, False, False),
             decoder_spatio_temporal_scaling=(True, True, False, False),
             decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
             patch_size=1, patch_size_t=1, scaling_factor=0.9), 9,
        lambda z, vae: (z - vae.latents_mean.view(1, -1, 1, 1, 1)) * vae.config.scaling_factor
        / vae.latents_std.view(1, -1, 1, 1, 1)),
    "AutoencoderKLHunyuanVideo15": (  # pipeline_hunyuan_video1_5_image2video.py:386-387 (diffusers 0.42.1):
        # retrieve_latents(vae.encode(x), sample_mode="argmax") * vae.config.scaling_factor; decoded at :825
        dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, spatial_compression_ratio=8,
             temporal_compression_ratio=4, scaling_factor=0.8), 9,
        lambda z, vae: z * vae.config.scaling_factor),
    "AutoencoderKLLTX2Video": (  # pipeline_ltx2.py:687-694 LTX2Pipeline._normalize_latents, the model's buffers;
        # no ratios in the config: they follow from the blocks' downsample types (16x space, 8x time here)
        dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 16, 32),
             layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1), patch_size=2,
             scaling_factor=0.9), 9,
        lambda z, vae: (z - vae.latents_mean.view(1, -1, 1, 1, 1)) * vae.config.scaling_factor
        / vae.latents_std.view(1, -1, 1, 1, 1)),
    "AutoencoderKLMochi": (  # inverse of pipeline_mochi's z * std / scaling_factor + mean
        dict(encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
             layers_per_block=(1, 1, 1, 1, 1), latents_mean=_stats(12, -0.5), latents_std=_stats(12, 0.6),
             scaling_factor=1.3), 7,
        lambda z, vae: (z - torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1))
        * vae.config.scaling_factor / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)),
}


def test_every_family_in_the_registry_is_tested():
    assert {name.split(":")[0] for name in TINY} == set(FAMILIES)


def _save(class_name, config, folder) -> str:
    torch.manual_seed(0)
    vae = getattr(diffusers, class_name)(**config)
    if class_name in ("AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video"):  # non-trivial stats, carried in the weights
        vae.latents_mean.copy_(torch.linspace(-0.3, 0.3, vae.latents_mean.numel()))
        vae.latents_std.copy_(torch.linspace(0.7, 1.4, vae.latents_std.numel()))
    vae.save_pretrained(os.path.join(folder, "vae"))
    return folder


@pytest.mark.parametrize("class_name", sorted(TINY))
def test_family_matches_diffusers_and_records_its_normalisation(class_name, tmp_path):
    config, num_frames, normalise = TINY[class_name]
    class_name = class_name.split(":")[0]  # "Class:variant"
    model = _save(class_name, config, str(tmp_path / "m"))
    info = inspect_model(model)
    assert info.class_name == class_name
    assert info.check_num_frames(num_frames) is None and info.check_num_frames(num_frames + 1)

    cfg = Config(input=str(tmp_path), output=str(tmp_path / "out"), model=model, num_frames=num_frames,
                 height=SIZE, width=SIZE, device="cpu", dtype="float32", latent_dtype="float32",
                 num_actors=(1, 1))
    frames = samples.synthetic_frames(num_frames, SIZE, SIZE)
    batch = {"frames": frames.transpose(3, 0, 1, 2)[None], "clip_id": np.array(["c"], dtype=object),
             "source_uri": np.array(["u"], dtype=object), **{k: np.zeros(1) for k in
                                                            ("clip_index", "start_frame", "num_frames", "fps",
                                                             "height", "width")}}
    got = VAEEncoder(cfg, info)(batch)["latents"][0]

    vae = getattr(diffusers, class_name).from_pretrained(model, subfolder="vae").eval()
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = normalise(vae.encode(x).latent_dist.mode(), vae)
    expected = z.permute(0, 2, 1, 3, 4)[0].numpy()
    assert got.shape == expected.shape == info.latent_shape(num_frames, SIZE, SIZE)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    meta = json.loads(sink.dataset_metadata(cfg.replace(dtype="float32"), info))
    assert meta["vae_class"] == class_name
    assert meta["scaling_factor"] == pytest.approx(config.get("scaling_factor", 1.0))
    if "latents_mean" in config:
        assert meta["latents_mean"] == pytest.approx(config["latents_mean"])
    if class_name == "AutoencoderKLCogVideoX":
        assert meta["invert_scale_latents"] is True
    if class_name == "AutoencoderKLLTX2Video":
        assert meta["vae_patch_size"] == {"patch_size": 2, "patch_size_t": 1}


def test_hunyuan_video_15_encodes_a_batch_clip_by_clip(tmp_path):
    """diffusers 0.42.1's AutoencoderKLHunyuanVideo15 fails on a batch of two (its attention mask
    is built for one video): the actor encodes its clips one per call, and each clip's latents are
    those it has alone."""
    config, num_frames, _ = TINY["AutoencoderKLHunyuanVideo15"]
    model = _save("AutoencoderKLHunyuanVideo15", config, str(tmp_path / "m"))
    info = inspect_model(model)
    cfg = Config(input=str(tmp_path), output=str(tmp_path / "out"), model=model, num_frames=num_frames,
                 height=SIZE, width=SIZE, device="cpu", dtype="float32", latent_dtype="float32",
                 num_actors=(1, 1), batch_size=2)
    encoder = VAEEncoder(cfg, info)
    a = samples.synthetic_frames(num_frames, SIZE, SIZE).transpose(3, 0, 1, 2)
    b = np.ascontiguousarray(a[:, ::-1])
    both = encoder.encode(np.stack([a, b]), ["a", "b"])["latents"]
    alone = encoder.encode(b[None], ["b"])["latents"][0]
    np.testing.assert_allclose(both[1], alone, rtol=1e-5, atol=1e-6)


def test_mochi_in_bfloat16_keeps_its_fourier_features_in_float32(tmp_path):
    """Mochi's encoder starts with sin/cos of the pixels times up to 2**7 * 2 pi (diffusers'
    FourierFeatures, autoencoder_kl_mochi.py:408-434 in 0.42.1): computed from a bfloat16 input
    they are noise, and the latents were 0.68 (relative L2) from float32's on the first GPU run
    (bench/results/gpu-h200-2026-12-04.json), 0.89 here. The encoder keeps the input float32 and
    casts the features after; then bfloat16 is as close as the other families' (0.021 here)."""
    config, num_frames, normalise = TINY["AutoencoderKLMochi"]
    model = _save("AutoencoderKLMochi", config, str(tmp_path / "m"))
    info = inspect_model(model)
    cfg = Config(input=str(tmp_path), output=str(tmp_path / "out"), model=model, num_frames=num_frames,
                 height=SIZE, width=SIZE, device="cpu", dtype="bfloat16", latent_dtype="float32",
                 num_actors=(1, 1))
    frames = samples.synthetic_frames(num_frames, SIZE, SIZE)
    got = VAEEncoder(cfg, info).encode(frames.transpose(3, 0, 1, 2)[None], ["c"])["latents"][0]

    vae = diffusers.AutoencoderKLMochi.from_pretrained(model, subfolder="vae").eval()
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = normalise(vae.encode(x).latent_dist.mode(), vae).permute(0, 2, 1, 3, 4)[0].numpy()
    error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert error < 0.05, f"bfloat16 Mochi latents {error:.3f} from float32's (relative L2)"
