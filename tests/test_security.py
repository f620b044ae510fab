"""Model weights load from safetensors only, unless the user vouches for pickle."""
import os

import pytest

from pipeline import samples
from pipeline.cli import main
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH


@pytest.fixture(scope="module")
def pickle_vae(tmp_path_factory) -> str:
    import torch
    from diffusers import AutoencoderKLCogVideoX

    folder = str(tmp_path_factory.mktemp("pickle_model"))
    torch.manual_seed(0)
    AutoencoderKLCogVideoX(**samples.TINY_COGVIDEOX).save_pretrained(
        os.path.join(folder, "vae"), safe_serialization=False)
    assert any(f.endswith(".bin") for f in os.listdir(os.path.join(folder, "vae")))
    return folder


def test_pickle_weights_are_refused_unless_allowed(ray_local, pickle_vae, tmp_path, capsys):
    videos = tmp_path / "in"
    samples.write_video(str(videos / "v.mp4"), samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH))
    args = ["encode", str(videos), str(tmp_path / "out"), "--model", pickle_vae,
            "--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "--allow-pickle" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out" / "latents")
    assert main([*args, "--allow-pickle"]) == 0
    assert len(os.listdir(tmp_path / "out" / "latents")) == 1
