"""Reading OUTPUT back: pipeline.read_latents (Ray) and pipeline.LatentDataset (torch), local and S3."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import pipeline
from pipeline import sink
from pipeline.config import Config


def write_output(output: str, endpoint=None, files=3, per_file=4) -> dict:
    """Write files x per_file clips the way the pipeline's sink does; return {clip_id: latents}."""
    cfg = Config(input="i", output=output, model="m", s3_endpoint=endpoint)
    rng = np.random.default_rng(0)
    expected = {}
    for f in range(files):
        ids = [f"clip-{f}-{i}" for i in range(per_file)]
        latents = rng.standard_normal((per_file, 3, 4, 8, 8)).astype(np.float16)
        batch = {"clip_id": np.array(ids, dtype=object),
                 "source_uri": np.array([f"s3://b/v{f}.mp4"] * per_file, dtype=object),
                 "clip_index": np.arange(per_file), "start_frame": np.arange(per_file) * 9,
                 "num_frames": np.full(per_file, 9), "fps": np.full(per_file, 24.0),
                 "height": np.full(per_file, 64), "width": np.full(per_file, 64), "latents": latents}
        sink.write_latents(batch, cfg, json.dumps({"layout": "TCHW", "vae_class": "X"}))
        expected.update(zip(ids, latents))
    return expected


def check_items(items, expected):
    assert len(items) == len(expected)
    for item in items:
        assert isinstance(item["latents"], torch.Tensor) and item["latents"].shape == (3, 4, 8, 8)
        np.testing.assert_array_equal(item["latents"].numpy(), expected[item["clip_id"]])
        assert item["fps"] == 24.0 and item["source_uri"].startswith("s3://b/v")


def test_map_style_dataset_and_dataloader(tmp_path):
    expected = write_output(str(tmp_path))
    data = pipeline.LatentDataset(str(tmp_path))
    assert isinstance(data, torch.utils.data.Dataset) and len(data) == 12
    assert data.metadata == {"layout": "TCHW", "vae_class": "X"}
    check_items([data[i] for i in range(len(data))], expected)
    assert data[-1]["clip_id"] == data[11]["clip_id"]
    with pytest.raises(IndexError):
        data[12]
    batch = next(iter(DataLoader(data, batch_size=5, shuffle=True)))
    assert batch["latents"].shape == (5, 3, 4, 8, 8) and len(batch["clip_id"]) == 5


def test_streaming_dataset_shards_files_across_workers(tmp_path):
    expected = write_output(str(tmp_path))
    data = pipeline.LatentDataset(str(tmp_path), streaming=True)
    assert isinstance(data, torch.utils.data.IterableDataset)
    check_items(list(data), expected)
    loaded = [item for batch in DataLoader(data, batch_size=None, num_workers=2) for item in [batch]]
    assert sorted(i["clip_id"] for i in loaded) == sorted(expected)  # each clip exactly once


def test_readers_on_s3(ray_local, s3_server, s3_bucket, monkeypatch):
    _, bucket = s3_bucket
    expected = write_output(f"s3://{bucket}/run", endpoint=s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    check_items([pipeline.LatentDataset(f"s3://{bucket}/run")[i] for i in range(12)], expected)
    ds = pipeline.read_latents(f"s3://{bucket}/run")
    rows = ds.take_all()
    assert len(rows) == 12
    for row in rows:
        np.testing.assert_array_equal(row["latents"], expected[row["clip_id"]])
    batch = next(iter(ds.select_columns(["latents"]).iter_torch_batches(batch_size=4)))
    assert batch["latents"].shape == (4, 3, 4, 8, 8)
