"""preview: latents decoded back, compared with the clip cut again from its source."""
import csv
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import samples
from pipeline.cli import main
from pipeline.preview import psnr
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH, decode_all_rgb


def test_preview_writes_strips_videos_and_a_correct_psnr(ray_local, tiny_vae, tmp_path, capsys):
    videos = tmp_path / "in"
    samples.write_video(str(videos / "a.mp4"), samples.synthetic_frames(2 * NUM_FRAMES, HEIGHT, WIDTH, 3))
    out = str(tmp_path / "out")
    assert main(["encode", str(videos), out, "--model", tiny_vae, "--num-frames", str(NUM_FRAMES),
                 "--height", str(HEIGHT), "--width", str(WIDTH), "--latent-dtype", "float32"]) == 0
    assert main(["preview", out, "--model", tiny_vae, "--n", "2"]) == 0
    assert "mean PSNR" in capsys.readouterr().out

    folder = os.path.join(out, "preview")
    rows = list(csv.DictReader(open(os.path.join(folder, "psnr.csv"))))
    assert len(rows) == 2
    for row in rows:
        strip = np.asarray(Image.open(os.path.join(folder, f"{row['clip_id']}.png")))
        assert strip.shape == (2 * HEIGHT, 4 * WIDTH, 3)
        with av.open(os.path.join(folder, f"{row['clip_id']}.mp4")) as c:
            frames = list(c.decode(video=0))
        assert len(frames) == NUM_FRAMES and (frames[0].width, frames[0].height) == (2 * WIDTH, HEIGHT)

        # The PSNR equals one computed straight from diffusers on the same clip.
        from diffusers import AutoencoderKLCogVideoX
        import pyarrow.dataset as pads
        import pyarrow.compute as pc

        table = pads.dataset(os.path.join(out, "latents"), format="parquet").to_table()
        one = table.filter(pc.equal(table.column("clip_id"), row["clip_id"]))
        z = torch.from_numpy(one.column("latents").combine_chunks().to_numpy_ndarray()[0].copy())
        vae = AutoencoderKLCogVideoX.from_pretrained(tiny_vae, subfolder="vae").eval()
        with torch.no_grad():
            x = vae.decode((z / vae.config.scaling_factor).permute(1, 0, 2, 3)[None]).sample[0]
        recon = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        start = one.column("start_frame")[0].as_py()
        original = decode_all_rgb(str(videos / "a.mp4"))[start:start + NUM_FRAMES].transpose(3, 0, 1, 2)
        assert abs(float(row["psnr_db"]) - psnr(original, recon)) < 1e-2


def _ltx2_decode(vae, latents):
    """LTX2Pipeline after denoising (diffusers 0.42.1 pipeline_ltx2.py:1637-1659): no timestep
    unless the VAE is timestep-conditioned, then the default decode_timestep 0.0 (its noise scale
    defaults to it, :963-964, 1643-1651), _denormalize_latents, vae.decode."""
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

    timestep = torch.zeros(1) if vae.config.timestep_conditioning else None
    z = LTX2Pipeline._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    return vae.decode(z, timestep, return_dict=False)[0]


# class -> (extra config, how its pipeline decodes stored latents [B, C, T, h, w])
DECODERS = {
    # HunyuanVideo15Pipeline (diffusers 0.42.1 pipeline_hunyuan_video1_5.py:825-826)
    "AutoencoderKLHunyuanVideo15": ({}, lambda vae, z: vae.decode(z / vae.config.scaling_factor,
                                                                 return_dict=False)[0]),
    # timestep-conditioned, as LTX-2's decoder is: preview passed no timestep and failed
    "AutoencoderKLLTX2Video": ({"timestep_conditioning": True}, _ltx2_decode),
}


@pytest.mark.parametrize("class_name", sorted(DECODERS))
def test_preview_decodes_the_new_families_as_their_pipelines_do(class_name, tmp_path):
    """The stored latents, decoded by preview, equal the family's pipeline decoding them; and
    decoding them without the de-normalisation would give other frames (the check has teeth)."""
    import diffusers

    from actors.encoder import VAEEncoder, load_vae
    from pipeline.config import Config
    from pipeline.model import inspect_model
    from pipeline.preview import reconstruct
    from tests.test_families import TINY, _save

    extra, pipeline_decode = DECODERS[class_name]
    config, frames, _ = TINY[class_name]
    model = _save(class_name, {**config, **extra}, str(tmp_path / "m"))
    info = inspect_model(model)
    cfg = Config(input=str(tmp_path), output=str(tmp_path / "out"), model=model, num_frames=frames, height=64,
                 width=64, device="cpu", dtype="float32", latent_dtype="float32", num_actors=(1, 1))
    clip = samples.synthetic_frames(frames, 64, 64).transpose(3, 0, 1, 2)
    stored = VAEEncoder(cfg, info).encode(clip[None], ["c"])["latents"][0]  # [T, C, h, w], as the run writes

    got = reconstruct(load_vae(cfg, info), info, stored, "mode")
    vae = getattr(diffusers, class_name).from_pretrained(model, subfolder="vae").eval()
    z = torch.from_numpy(np.ascontiguousarray(stored)).permute(1, 0, 2, 3)[None]
    timestep = (torch.zeros(1),) if vae.config.get("timestep_conditioning") else ()
    with torch.no_grad():
        want, raw = (((x.clamp(-1, 1)[0] + 1) * 127.5).round().to(torch.uint8).numpy()
                     for x in (pipeline_decode(vae, z), vae.decode(z, *timestep).sample))  # raw: not de-normalised
    assert got.shape == want.shape == (3, frames, 64, 64)
    assert np.abs(got.astype(int) - want).max() <= 1
    assert np.abs(raw.astype(int) - want).max() > 8
