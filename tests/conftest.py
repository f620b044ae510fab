"""Shared fixtures: a real moto S3 server on loopback, a real local Ray, generated videos, and a
tiny random-weight CogVideoX VAE loaded through ``from_pretrained``."""
from __future__ import annotations

import os
import tempfile

# Fake credentials for the local S3 server, set before Ray starts so its workers inherit them,
# and so no test can ever reach a real AWS account.
for _key, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[_key] = _value
os.environ.pop("AWS_ENDPOINT_URL", None)
# The pipeline's test-only fault hooks (pipeline/hooks.py) for the in-process Ray: a folder per
# test session, set before Ray starts so that its workers inherit it.
HOOKS_DIR = tempfile.mkdtemp(prefix="vl-hooks-")
os.environ["VIDEO_LATENTS_TEST_HOOKS"] = HOOKS_DIR
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline import samples  # noqa: E402
from tests.hookctl import Hooks  # noqa: E402

# The shape every test encodes at: the tiny VAE compresses 8x in space, 4x in time.
NUM_FRAMES, HEIGHT, WIDTH = 9, 64, 64


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> str:
    return samples.make_tiny_vae(str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto) on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the test server; yields a boto3 client and the bucket name."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    name = "vl-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client.create_bucket(Bucket=name)
    yield client, name


def upload_folder(client, bucket: str, folder: str, prefix: str) -> None:
    for root, _dirs, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            client.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, folder)}")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (2 CPUs, as on CI)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def decode_all_rgb(path: str) -> np.ndarray:
    """Every frame of a video as uint8 [N, H, W, 3], decoded with PyAV at its own size."""
    import av

    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def reference_latents(vae_dir: str, frames: np.ndarray, mode: str = "mode") -> np.ndarray:
    """The reference computation, straight from diffusers: frames uint8 [F,H,W,3] -> [T,C,h,w]."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_pretrained(vae_dir, subfolder="vae").eval()
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z = dist.mode() * vae.config.scaling_factor
    return z.permute(0, 2, 1, 3, 4)[0].numpy()


@pytest.fixture
def hooks():
    """Arm the in-process Ray's fault hooks; disarmed (and the signals FIFO closed) afterwards."""
    h = Hooks(HOOKS_DIR)
    yield h
    h.close()
