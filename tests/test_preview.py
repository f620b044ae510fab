"""preview: latents decoded back, compared with the clip cut again from its source."""
import csv
import os

import av
import numpy as np
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
