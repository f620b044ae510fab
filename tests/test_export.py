"""``video-latents export``: OUTPUTs built as the sink writes them (metadata from tiny real VAEs
through ``inspect_model`` and ``sink.dataset_metadata``), exported, and read back the way each
trainer's own loader reads its cache:

- musubi-tuner (kohya-ss/musubi-tuner @ 30c658c4f4b0bf05038b3346eff9670259b10fc7):
  ``VideoDataset.prepare_for_training`` (dataset/image_video_dataset.py) and
  ``BucketBatchManager.__getitem__`` (dataset/bucket.py);
- finetrainers (a-r-r-o-w/finetrainers @ f476c37, data/precomputation.py):
  ``PrecomputedOnceDataIterable`` and ``_load_item``, then each model specification's ``forward``
  unpacking of what it loaded.

OUTPUTs carry the columns and metadata the pipeline writes with --text-embeddings and
--image-latents: ``caption``, ``prompt_embeds`` [L, D] (no mask column for CogVideoX and Wan,
whose pipelines use none), ``image_latents`` (``image_latents_mean``/``_logvar`` in dist mode), and
``text_encoder`` / ``image_latents`` in the metadata.

No Ray: the export is plain file work.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline import samples, sink, text
from tests.hookctl import Hooks
from pipeline.commands import export as ex
from pipeline.commands.export import common
from pipeline.config import Config
from pipeline.model import inspect_model
from pipeline.schema import image_columns, tensor_columns

NUM_FRAMES, SIZE = 9, 64
TEXT_LEN, TEXT_DIM = 12, 8


# --- tiny real VAEs, saved as a pipeline folder ----------------------------------------------------

def _save_vae(folder, class_name: str, **config) -> str:
    import diffusers

    torch.manual_seed(0)
    getattr(diffusers, class_name)(**config).save_pretrained(os.path.join(folder, "vae"))
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "cogvideox": samples.make_tiny_vae(str(root / "cogvideox")),
        # Channels as the real models have: musubi's architectures take 16-channel latents.
        "hunyuan": _save_vae(root / "hunyuan", "AutoencoderKLHunyuanVideo", block_out_channels=(8, 8, 8, 8),
                             latent_channels=16, layers_per_block=1, norm_num_groups=4),
        "wan": _save_vae(root / "wan", "AutoencoderKLWan", base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1],
                         num_res_blocks=1, temperal_downsample=[False, True, True]),
        "wan-4ch": _save_vae(root / "wan4", "AutoencoderKLWan", base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1],
                             num_res_blocks=1, temperal_downsample=[False, True, True],
                             latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.9, 1.1, 1.3, 0.7]),
    }


# --- OUTPUTs, written as the pipeline writes them --------------------------------------------------

def _job(model: str, mode: str, latent_dtype: str = "float16", prompts: bool = False, image: bool = False,
         text_len: int = TEXT_LEN, height: int = SIZE, width: int = SIZE):
    """(cfg, info, metadata dict) for a run of ``model`` in ``mode``, with --text-embeddings
    (``prompts``) and --image-latents (``image``)."""
    info = inspect_model(model)
    cfg = Config(input="in", output="out", model=model, num_frames=NUM_FRAMES, height=height, width=width,
                 latent_mode=mode, latent_dtype=latent_dtype, dtype="float32", device="cpu", image_latents=image)
    meta = json.loads(sink.dataset_metadata(cfg, info))
    if prompts:  # pipeline.text's TextInfo.metadata, for a T5-style encoder without a mask
        meta["text_encoder"] = {"class": "UMT5EncoderModel", "tokenizer_class": "T5TokenizerFast", "source": model,
                                "max_sequence_length": text_len, "pipeline": text.PIPELINES[info.class_name],
                                "dtype": "float32", "attention_mask": False}
    return cfg, info, meta


def _clip_ids(n: int, seed: str = "clip") -> list[str]:
    return [hashlib.blake2b(f"{seed}{i}".encode(), digest_size=16).hexdigest() for i in range(n)]


def _write_output(out, cfg: Config, meta: dict, columns: dict, files: int = 1, complete: bool = True,
                  seed: str = "clip") -> list[str]:
    """Write OUTPUT/latents/*.parquet as the sink writes it: its table (columns, tensor type and
    metadata) from a batch holding ``columns`` (latents, caption, prompt_embeds, image latents);
    ``files`` splits the rows over several files."""
    n = len(next(iter(columns.values())))
    ids = _clip_ids(n, seed)
    batch = {"clip_id": np.array(ids, dtype=object), "source_uri": np.array([f"s3://in/v{i}.mp4" for i in range(n)]),
             "clip_index": np.arange(n), "start_frame": np.arange(n) * NUM_FRAMES,
             "num_frames": np.full(n, NUM_FRAMES), "fps": np.full(n, 24.0), "height": np.full(n, cfg.height),
             "width": np.full(n, cfg.width), **columns}
    table = sink.latents_table(batch, cfg, json.dumps(meta))
    assert set(columns) <= set(table.column_names)  # the sink writes every column the batch has
    os.makedirs(os.path.join(out, "latents"), exist_ok=True)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for k in range(files):
        pq.write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]),
                       os.path.join(out, "latents", f"part-{k:03d}.parquet"), row_group_size=2)
    if complete:
        (out / "_SUCCESS").write_text("{}")
    return ids


def _normalise(z: np.ndarray, meta: dict) -> np.ndarray:
    """What the encoder stores for a raw [N, T, C, h, w] latent z, computed here from the metadata
    independently of the export: (z - shift - mean) * scaling_factor / std."""
    mean = np.asarray(meta["latents_mean"] or 0.0, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(meta["latents_std"] or 1.0, dtype=np.float32).reshape(-1, 1, 1)
    return (z - (meta["shift_factor"] or 0.0) - mean) * meta["scaling_factor"] / std


def _prompts(rng, lengths: list[int], dtype=np.float32, text_len: int = TEXT_LEN) -> np.ndarray:
    """prompt_embeds [N, L, D] padded as WanPipeline leaves them: zero after each prompt's tokens."""
    embeds = rng.standard_normal((len(lengths), text_len, TEXT_DIM)).astype(dtype)
    for i, length in enumerate(lengths):
        embeds[i, length:] = 0
    return embeds


def _latent_shape(info) -> tuple:
    return info.latent_shape(NUM_FRAMES, SIZE, SIZE)


# --- the trainers' loaders, reimplemented from their source ----------------------------------------

def _remove_dtype_suffix(name: str) -> str:
    """musubi utils/model_utils.remove_dtype_suffix: any torch dtype name, longest first."""
    names = sorted({str(v).split(".")[-1] for v in vars(torch).values() if isinstance(v, torch.dtype)},
                   key=len, reverse=True)
    for dtype in names:
        if name.endswith("_" + dtype):
            return name[: -len(dtype) - 1]
    return name


def musubi_load(cache_dir: str, arch: str) -> dict:
    """musubi's VideoDataset.prepare_for_training, then BucketBatchManager.__getitem__ for each
    bucket as one batch: {(width, height, frame_count): batch dict}."""
    buckets: dict[tuple, list] = {}
    for cache_file in sorted(glob.glob(os.path.join(cache_dir, f"*_{arch}.safetensors"))):
        tokens = os.path.basename(cache_file).split("_")
        image_width, image_height = map(int, tokens[-2].split("x"))
        frame_pos, frame_count = (int(t) for t in tokens[-3].split("-")[:2])
        item_key = "_".join(tokens[:-3])
        te_file = os.path.join(cache_dir, f"{item_key}_{arch}_te.safetensors")
        if not os.path.exists(te_file):  # musubi: "Text encoder output cache file not found", skipped
            continue
        # enable_bucket=False: one bucket per resolution, as (width, height, frame_count)
        buckets.setdefault((image_width, image_height, frame_count), []).append((cache_file, te_file))
    batches = {}
    for key, items in buckets.items():
        data, varlen = {}, set()
        for latent_path, te_path in items:
            sd = {**load_file(latent_path), **load_file(te_path)}
            for name, tensor in sd.items():
                content = name.replace("varlen_", "") if name.startswith("varlen_") else name
                if not content.endswith("_mask"):
                    content = _remove_dtype_suffix(content)
                    if content.startswith("latents_"):
                        content = content.rsplit("_", 1)[0]  # the FxHxW
                data.setdefault(content, []).append(tensor)
                if name.startswith("varlen_"):
                    varlen.add(content)
        batches[key] = {k: v if k in varlen else torch.stack(v) for k, v in data.items()}
    return batches


def finetrainers_load(precomputation_dir: str, data_type: str, rank: int = 0, world_size: int = 1) -> list[dict]:
    """finetrainers' PrecomputedOnceDataIterable, one pass over this rank's items."""
    save_dir = os.path.join(precomputation_dir, "finetrainers-precomputed-data")
    num_items = len(glob.glob(os.path.join(save_dir, f"{data_type}-*.pt")))
    per_rank = max(1, num_items // world_size)
    return [torch.load(os.path.join(save_dir, f"{data_type}-{rank * per_rank + i}.pt"), weights_only=True)
            for i in range(per_rank)]


def _jsonl(dest) -> list[dict]:
    return [json.loads(x) for x in (dest / ex.MUSUBI_JSONL).read_text().splitlines()]


def _export(output, dest, fmt, capsys, s3_endpoint=None) -> tuple[int, str]:
    code = ex.export_command(str(output), str(dest), fmt, s3_endpoint)
    return code, capsys.readouterr().err


# --- finetrainers ----------------------------------------------------------------------------------

def test_cogvideox_finetrainers_holds_the_moments_its_own_precomputation_would(models, tmp_path, capsys):
    """A real tiny CogVideoX VAE encodes in dist mode through our encoder; finetrainers' latent file
    must equal what its CogVideoXLatentEncodeProcessor stores with compute_posterior=False:
    ``vae._encode(video)`` permuted to [B, F, 2C, H, W]."""
    import diffusers
    from actors.encoder import VAEEncoder

    cfg, info, meta = _job(models["cogvideox"], "dist", latent_dtype="float32", prompts=True, text_len=226)
    frames = np.stack([samples.synthetic_frames(NUM_FRAMES, SIZE, SIZE, seed=i).transpose(3, 0, 1, 2)
                       for i in range(2)])  # uint8 [B, 3, F, H, W], as the encoder receives clips
    encoded = VAEEncoder(cfg, info).encode(frames, _clip_ids(2))
    prompts = _prompts(np.random.default_rng(1), [5, 226], text_len=226)
    _write_output(tmp_path / "out", cfg, meta, {**encoded, "prompt_embeds": prompts, "caption": ["a cat", "a dog"]})

    code, err = _export(tmp_path / "out", tmp_path / "dest", "finetrainers", capsys)
    assert code == 0, err

    latents = finetrainers_load(str(tmp_path / "dest"), "latent")
    conditions = finetrainers_load(str(tmp_path / "dest"), "condition")
    assert len(latents) == len(conditions) == 2
    vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(models["cogvideox"], subfolder="vae").eval()
    with torch.no_grad():
        moments = vae._encode(torch.from_numpy(frames).float() / 127.5 - 1).permute(0, 2, 1, 3, 4)
    t, c, h, w = _latent_shape(info)
    for i, item in enumerate(latents):
        assert set(item) == {"latents"}
        assert item["latents"].shape == (1, t, 2 * c, h, w) and item["latents"].dtype == torch.float32
        # CogVideoXModelSpecification.forward: DiagonalGaussianDistribution(latents, _dim=2) chunks
        # dim 2 into mean and logvar and clamps logvar to [-30, 20].
        mean, logvar = torch.chunk(item["latents"], 2, dim=2)
        want_mean, want_logvar = torch.chunk(moments[i:i + 1], 2, dim=2)
        torch.testing.assert_close(mean, want_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logvar.clamp(-30, 20), want_logvar.clamp(-30, 20), rtol=1e-4, atol=1e-5)
    for i, item in enumerate(conditions):  # the specification pops the mask: padded states only
        assert set(item) == {"encoder_hidden_states"}
        torch.testing.assert_close(item["encoder_hidden_states"], torch.from_numpy(prompts[i:i + 1]))
    # collate_latents / collate_conditions: torch.cat on the leading batch dimension
    assert torch.cat([x["latents"] for x in latents]).shape == (2, t, 2 * c, h, w)
    marker = json.loads((tmp_path / "dest" / ex.MARKER).read_text())
    assert marker["complete"] and marker["items"] == 2 and marker["usable"]


def test_finetrainers_refuses_latents_without_the_posterior(models, tmp_path, capsys):
    cfg, info, meta = _job(models["cogvideox"], "mode")
    _write_output(tmp_path / "out", cfg, meta, {"latents": np.zeros((1, *_latent_shape(info)), np.float16)})
    code, err = _export(tmp_path / "out", tmp_path / "dest", "finetrainers", capsys)
    assert code == 2
    assert "--latent-mode dist" in err and "mean and logvar" in err
    assert not (tmp_path / "dest").exists()


def test_wan_finetrainers_moments_and_statistics_over_files(models, tmp_path, capsys, monkeypatch):
    """Wan: raw moments [1, 2C, F, H, W] with latents_mean and latents_std = 1/std, float32 [C];
    rows from several files and read a few at a time keep one contiguous index."""
    monkeypatch.setattr(common, "ROWS_PER_READ", 2)
    cfg, info, meta = _job(models["wan"], "dist", prompts=True, image=True)
    rng = np.random.default_rng(2)
    n, shape = 5, _latent_shape(info)
    mean = rng.standard_normal((n, *shape)).astype(np.float16)
    logvar = rng.uniform(-8, 0, (n, *shape)).astype(np.float16)
    prompts = _prompts(rng, [3, 4, 5, 6, 7], np.float16)
    image = np.zeros((n, 1, *shape[1:]), np.float16)
    _write_output(tmp_path / "out", cfg, meta, {"latents_mean": mean, "latents_logvar": logvar,
                                                "prompt_embeds": prompts, "image_latents_mean": image,
                                                "image_latents_logvar": image}, files=3)

    code, err = _export(tmp_path / "out", tmp_path / "dest", "finetrainers", capsys)
    assert code == 0, err
    assert "512" in err  # our prompts are padded to TEXT_LEN; finetrainers' Wan conditions to 512
    assert "without the mask, which changes the real tokens' states too" in err  # WanPipeline's, masked
    assert "only text-to-video checkpoints" in err and err.count("only text-to-video") == 1
    assert "image latents not exported" in err and "CLIP image embeddings" in err

    latents = finetrainers_load(str(tmp_path / "dest"), "latent")
    conditions = finetrainers_load(str(tmp_path / "dest"), "condition")
    vae_config = info.config
    t, c, h, w = shape
    for i, item in enumerate(latents):  # files are sorted by name and written in order
        assert set(item) == {"latents", "latents_mean", "latents_std"}
        assert item["latents"].shape == (1, 2 * c, t, h, w) and item["latents"].dtype == torch.float16
        mu, lv = torch.chunk(item["latents"], 2, dim=1)  # WanModelSpecification.forward
        assert torch.equal(mu[0], torch.from_numpy(mean[i]).permute(1, 0, 2, 3))
        assert torch.equal(lv[0], torch.from_numpy(logvar[i]).permute(1, 0, 2, 3))
        assert item["latents_mean"].dtype == item["latents_std"].dtype == torch.float32
        torch.testing.assert_close(item["latents_mean"], torch.tensor(vae_config["latents_mean"]))
        torch.testing.assert_close(item["latents_std"], 1.0 / torch.tensor(vae_config["latents_std"]))
        assert torch.equal(conditions[i]["encoder_hidden_states"], torch.from_numpy(prompts[i:i + 1]))
    # two ranks read disjoint halves: rank r starts at r * (items // world_size)
    rank1 = finetrainers_load(str(tmp_path / "dest"), "latent", rank=1, world_size=2)
    assert torch.equal(rank1[0]["latents"], latents[2]["latents"])


def test_finetrainers_without_prompt_embeds_writes_latents_and_exits_1(models, tmp_path, capsys):
    cfg, info, meta = _job(models["wan"], "dist")
    zeros = np.zeros((2, *_latent_shape(info)), np.float16)
    _write_output(tmp_path / "out", cfg, meta, {"latents_mean": zeros, "latents_logvar": zeros})
    code, err = _export(tmp_path / "out", tmp_path / "dest", "finetrainers", capsys)
    assert code == 1
    assert "condition-{i}.pt" in err and "prompt_embeds" in err
    assert len(finetrainers_load(str(tmp_path / "dest"), "latent")) == 2
    assert not glob.glob(str(tmp_path / "dest" / "*" / "condition-*.pt"))


# --- musubi-tuner ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["mode", "dist"])
def test_wan_musubi_cache_is_normalised_as_musubi_caches_it(models, tmp_path, capsys, mode):
    """musubi's WanVAE.encode caches (mu - mean) * (1 / std), [C, F, H, W]; a mode OUTPUT holds the
    pipeline's normalisation of the mode, a dist OUTPUT the raw mean: both must come out the same."""
    cfg, info, meta = _job(models["wan"], mode, latent_dtype="float32", prompts=True, image=True)
    rng = np.random.default_rng(3)
    z = rng.standard_normal((3, *_latent_shape(info))).astype(np.float32) * 2 + 0.5  # raw mu
    stored = {"latents": _normalise(z, meta)} if mode == "mode" else \
        {"latents_mean": z, "latents_logvar": np.full_like(z, -3.0)}
    lengths = [2, 5, TEXT_LEN]
    prompts = _prompts(rng, lengths)
    image = rng.standard_normal((3, 1, *_latent_shape(info)[1:])).astype(np.float32)
    captions = ["one", "two", "three"]
    ids = _write_output(tmp_path / "out", cfg, meta, {**stored, "prompt_embeds": prompts, "caption": captions,
                                                      **{c: image for c in image_columns(mode)}})

    code, err = _export(tmp_path / "out", tmp_path / "dest", "musubi", capsys)
    assert code == 0, err
    assert "image latents not exported" in err  # musubi's Wan I2V cache is not the first frame alone

    batches = musubi_load(str(tmp_path / "dest"), "wan")
    assert list(batches) == [(SIZE, SIZE, NUM_FRAMES)]
    batch = batches[(SIZE, SIZE, NUM_FRAMES)]
    assert set(batch) == {"latents", "t5"}  # no latents_image, no clip: a T2V cache
    mean = torch.tensor(info.config["latents_mean"]).view(-1, 1, 1, 1)
    std = torch.tensor(info.config["latents_std"]).view(-1, 1, 1, 1)
    order = np.argsort(ids)  # the loader globs files named by clip id
    want = (torch.from_numpy(z[order]).permute(0, 2, 1, 3, 4) - mean) * (1.0 / std)  # [N, C, F, H, W]
    torch.testing.assert_close(batch["latents"], want, rtol=1e-5, atol=1e-5)
    for got, i in zip(batch["t5"], order):  # varlen: trimmed to the real tokens, not stacked
        assert torch.equal(got, torch.from_numpy(prompts[i, :lengths[i]]))

    latent_file = glob.glob(str(tmp_path / "dest" / f"{ids[1]}_*_wan.safetensors"))[0]
    # {body}_{start_frame:05d}-{frames:03d}_{W:04d}x{H:04d}_{arch}: the second clip starts at frame 9
    assert os.path.basename(latent_file) == f"{ids[1]}_00009-009_0064x0064_wan.safetensors"
    with safe_open(latent_file, "pt") as f:
        t, c, h, w = _latent_shape(info)
        assert list(f.keys()) == [f"latents_{t}x{h}x{w}_float32"]
        assert f.metadata() == {"architecture": "wan", "width": str(SIZE), "height": str(SIZE),
                                "format_version": "1.0.1", "frame_count": str(NUM_FRAMES)}
    with safe_open(str(tmp_path / "dest" / f"{ids[1]}_wan_te.safetensors"), "pt") as f:
        assert list(f.keys()) == ["varlen_t5_float32"]
        assert f.metadata() == {"architecture": "wan", "caption1": "two", "format_version": "1.0.1"}
    # the dataset config's video_jsonl_file: musubi's VideoDataset needs one even to train from the cache
    assert [(x["video_path"], x["caption"]) for x in _jsonl(tmp_path / "dest")] == \
        [(f"{ids[i]}.mp4", captions[i]) for i in range(3)]
    summary = json.loads((tmp_path / "dest" / ex.MARKER).read_text())
    assert summary["use"].endswith(f"wan_train_network.py --dataset_config {tmp_path / 'dest' / ex.MUSUBI_TOML} ...")
    config = tomllib.loads((tmp_path / "dest" / ex.MUSUBI_TOML).read_text())
    # dataset/config_utils.py's schema: [general] and one [[datasets]] naming the JSONL and the cache
    assert config["general"]["resolution"] == [SIZE, SIZE] and config["general"]["enable_bucket"] is False
    assert config["datasets"] == [{"video_jsonl_file": str(tmp_path / "dest" / ex.MUSUBI_JSONL),
                                   "cache_directory": str(tmp_path / "dest"), "target_frames": [NUM_FRAMES],
                                   "frame_extraction": "head"}]
    if mode == "dist":  # musubi's Wan cache holds the mean: a dist OUTPUT's mean is the same thing
        assert "posterior" not in err


def test_hunyuan_musubi_latents_unscaled_and_text_left_to_musubi(models, tmp_path, capsys):
    """musubi caches HunyuanVideo latents unscaled and multiplies by the scaling factor in training
    (hv_train_network.scale_shift_latents): the export divides ours by the metadata's. Its text
    cache (Llama states + CLIP pooled) is not one video-latents computes: the captions go to the
    JSONL, whose names musubi's text caching turns into exactly the _te files the loader wants."""
    cfg, info, meta = _job(models["hunyuan"], "mode")
    rng = np.random.default_rng(4)
    z = rng.standard_normal((2, *_latent_shape(info))).astype(np.float32)
    ids = _write_output(tmp_path / "out", cfg, meta, {"latents": _normalise(z, meta).astype(np.float16),
                                                      "caption": ["a red car", "rain"]})

    code, err = _export(tmp_path / "out", tmp_path / "dest", "musubi", capsys)
    assert code == 1, err  # musubi would skip every item: not 0
    assert "CLIP pooled" in err and "_hv_te.safetensors" in err and ex.MUSUBI_JSONL in err
    assert (f"python src/musubi_tuner/cache_text_encoder_outputs.py --dataset_config "
            f"{tmp_path / 'dest' / ex.MUSUBI_TOML} --text_encoder1") in err  # the command that adds them
    assert "the posterior mean (a --latent-mode mode OUTPUT)" in err and "holds a posterior sample" in err
    assert not glob.glob(str(tmp_path / "dest" / "*_te.safetensors"))
    assert musubi_load(str(tmp_path / "dest"), "hv") == {}  # every item skipped until text is cached

    lines = _jsonl(tmp_path / "dest")
    assert [x["caption"] for x in lines] == ["a red car", "rain"]
    for line in lines:  # what musubi's cache_text_encoder_outputs.py writes for each line
        # (BaseDataset.get_text_encoder_output_cache_path, from the JSONL's video_path)
        stem = os.path.splitext(os.path.basename(line["video_path"]))[0]
        save_file({"llm_float16": torch.zeros(4, TEXT_DIM, dtype=torch.float16), "llm_mask": torch.ones(4)},
                  str(tmp_path / "dest" / f"{stem}_hv_te.safetensors"))
    batch = musubi_load(str(tmp_path / "dest"), "hv")[(SIZE, SIZE, NUM_FRAMES)]
    order = np.argsort(ids)
    assert batch["latents"].dtype == torch.float16
    want = torch.from_numpy(z[order]).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(batch["latents"].float(), want, rtol=2e-3, atol=2e-3)
    # what musubi's HunyuanVideo trainer then feeds the model: ours again, up to float16 rounding
    scaled = batch["latents"].float() * info.scaling_factor
    torch.testing.assert_close(scaled, torch.from_numpy(_normalise(z, meta)[order]).permute(0, 2, 1, 3, 4),
                               rtol=2e-3, atol=2e-3)
    with safe_open(glob.glob(str(tmp_path / "dest" / "*_hv.safetensors"))[0], "pt") as f:
        assert f.metadata()["architecture"] == "hunyuan_video"


def test_musubi_without_text_or_captions_exits_1(models, tmp_path, capsys):
    cfg, info, meta = _job(models["wan"], "mode")
    _write_output(tmp_path / "out", cfg, meta, {"latents": np.zeros((1, *_latent_shape(info)), np.float16)})
    code, err = _export(tmp_path / "out", tmp_path / "dest", "musubi", capsys)
    assert code == 1
    assert "no prompt_embeds" in err and "no caption column" in err
    assert len(glob.glob(str(tmp_path / "dest" / "*_wan.safetensors"))) == 1


# --- refusals and DEST -----------------------------------------------------------------------------

@pytest.mark.parametrize("model, mode, fmt, says", [
    ("cogvideox", "mode", "musubi", "--format finetrainers"),
    ("wan-4ch", "mode", "musubi", "16-channel"),
    ("hunyuan", "dist", "finetrainers", "--format musubi"),
])
def test_refuses_what_the_format_cannot_express(models, tmp_path, capsys, model, mode, fmt, says):
    cfg, info, meta = _job(models[model], mode)
    shape = (1, *_latent_shape(info))
    _write_output(tmp_path / "out", cfg, meta, {k: np.zeros(shape, np.float16) for k in tensor_columns(mode)})
    code, err = _export(tmp_path / "out", tmp_path / "dest", fmt, capsys)
    assert code == 2 and says in err
    assert not (tmp_path / "dest").exists()


def test_dest_holds_one_export_only(models, tmp_path, capsys):
    cfg, info, meta = _job(models["wan"], "mode", prompts=True)
    rng = np.random.default_rng(6)
    for name in ("out", "other"):
        _write_output(tmp_path / name, cfg, meta, {"latents": rng.standard_normal((1, *_latent_shape(info))).astype(
            np.float16), "prompt_embeds": _prompts(rng, [3])})
    assert _export(tmp_path / "out", tmp_path / "dest", "musubi", capsys)[0] == 0
    assert _export(tmp_path / "out", tmp_path / "dest", "musubi", capsys)[0] == 0  # a rerun rewrites it
    code, err = _export(tmp_path / "other", tmp_path / "dest", "musubi", capsys)
    assert code == 2 and "not empty" in err
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("x")
    assert _export(tmp_path / "out", tmp_path / "stray", "musubi", capsys)[0] == 2


def test_empty_output_is_refused(tmp_path, capsys):
    code, err = _export(tmp_path / "nothing", tmp_path / "dest", "musubi", capsys)
    assert code == 2 and "holds no latents" in err


def test_s3_output_to_s3_dest(models, tmp_path, capsys, s3_bucket, s3_server):
    from tests.conftest import upload_folder

    client, bucket = s3_bucket
    cfg, info, meta = _job(models["wan"], "dist", prompts=True)
    rng = np.random.default_rng(7)
    mean = rng.standard_normal((2, *_latent_shape(info))).astype(np.float16)
    _write_output(tmp_path / "out", cfg, meta, {"latents_mean": mean, "latents_logvar": mean,
                                                "prompt_embeds": _prompts(rng, [3, 5], np.float16)}, files=2)
    upload_folder(client, bucket, str(tmp_path / "out"), "run")

    code, err = _export(f"s3://{bucket}/run", f"s3://{bucket}/ft", "finetrainers", capsys, s3_endpoint=s3_server)
    assert code == 0, err
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="ft/")["Contents"])
    assert keys == ["ft/_export-files.txt", "ft/_export.json", "ft/finetrainers-dataset.json",
                    "ft/finetrainers-dataset/prompts.txt", "ft/finetrainers-dataset/videos.txt",
                    *(f"ft/finetrainers-precomputed-data/{t}-{i}.pt" for t in ("condition", "latent") for i in range(2))]
    config = json.loads(client.get_object(Bucket=bucket, Key="ft/finetrainers-dataset.json")["Body"].read())
    assert config["datasets"][0]["data_root"] == "./finetrainers-dataset"  # from a local copy of DEST
    body = client.get_object(Bucket=bucket, Key="ft/finetrainers-precomputed-data/latent-1.pt")["Body"].read()
    item = torch.load(io.BytesIO(body), weights_only=True)
    mu = torch.chunk(item["latents"], 2, dim=1)[0][0]
    assert torch.equal(mu, torch.from_numpy(mean[1]).permute(1, 0, 2, 3))


# --- pieces ----------------------------------------------------------------------------------------

def test_rows_honour_a_tensor_permutation_and_slicing():
    logical = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 4, 3)
    permuted = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(logical.transpose(0, 2, 1))
                                                           .transpose(0, 2, 1))
    assert permuted.type.permutation == [1, 0]
    for array, want in ((permuted, logical), (sink.tensor_array(logical).slice(1), logical[1:])):
        rows = list(ex.batch_rows(pa.RecordBatch.from_arrays([array], ["x"])))
        assert np.array_equal(np.stack([r["x"] for r in rows]), want)


def test_raw_latents_undoes_every_normalisation_term():
    meta = {"latent_mode": "mode", "normalization_applied": True, "scaling_factor": 0.7, "shift_factor": 0.2,
            "latents_mean": [0.1, -0.3], "latents_std": [0.5, 2.0]}
    z = np.random.default_rng(8).standard_normal((3, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(ex.raw_latents({"latents": _normalise(z, meta)}, meta), z, rtol=1e-5, atol=1e-6)
    with pytest.raises(ex.ExportError, match="not in its metadata"):
        ex.raw_latents({"latents": z}, {**meta, "latents_std": "model buffers latents_mean/latents_std"})


def test_cli_export(models, tmp_path):
    """`python -m pipeline export` in a fresh process: the subcommand, its summary and exit codes."""
    cfg, info, meta = _job(models["wan"], "dist", prompts=True)
    zeros = np.zeros((2, *_latent_shape(info)), np.float16)
    _write_output(tmp_path / "out", cfg, meta, {"latents_mean": zeros, "latents_logvar": zeros,
                                                "prompt_embeds": _prompts(np.random.default_rng(9), [3, 4])})
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipeline", "export", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=120)

    done = cli(tmp_path / "out", tmp_path / "dest", "--format", "finetrainers")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["items"] == 2
    assert sorted(os.listdir(tmp_path / "dest" / ex.FINETRAINERS_DIR)) == \
        ["condition-0.pt", "condition-1.pt", "latent-0.pt", "latent-1.pt"]
    refused = cli(tmp_path / "out", tmp_path / "dest2", "--format", "musubi-tuner")
    assert refused.returncode == 2 and "invalid choice" in refused.stderr


# --- issue 21: what exit 0 promises ----------------------------------------------------------------

def finetrainers_start(config_path: str) -> dict:
    """What finetrainers does with --dataset_config before training (a-r-r-o-w/finetrainers @
    f476c3717da6cbfb1070505a99ee989426b46d9c): args.py:1012-1015 (the file must exist);
    trainer/sft_trainer/trainer.py:239-256 (json "datasets", data_root/dataset_file/dataset_type
    popped, initialize_dataset(data_root, ...)); data/dataset.py:834-840 (a name that is a valid Hub
    repo id is looked up on the Hub), :859-903 (_initialize_local_dataset: no metadata file, no
    .tar/.parquet, no caption/video file pairs, then caption and video lists), :272-315
    (VideoFileCaptionFileListDataset: one caption file and one video file, as many lines each);
    the rest of each entry goes to IterableDatasetPreprocessingWrapper (:680-691) as keywords."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    assert os.path.exists(config_path), f"Dataset config file {config_path} does not exist."
    with open(config_path) as f:
        configs = json.load(f)["datasets"]
    assert len(configs) >= 1
    for config in configs:
        data_root, dataset_file = config.pop("data_root", None), config.pop("dataset_file", None)
        assert config.pop("dataset_type") in ("image", "video") and not (data_root and dataset_file)
        config.pop("caption_options", None)
        with pytest.raises(HFValidationError):  # else repo_exists() asks the Hub
            validate_repo_id(data_root)
        root = data_root
        files = os.listdir(root)
        assert not {"metadata.json", "metadata.jsonl", "metadata.csv"} & set(files)
        assert not any(f.endswith((".tar", ".parquet")) for f in files)
        captions = [f for f in ["caption.txt", "captions.txt", "prompt.txt", "prompts.txt"] if f in files]
        videos = [f for f in ["video.txt", "videos.txt"] if f in files]
        assert len(captions) == len(videos) == 1
        with open(os.path.join(root, captions[0])) as f:
            n_captions = len(f.read().splitlines())
        with open(os.path.join(root, videos[0])) as f:
            n_videos = len(f.read().splitlines())
        assert n_captions == n_videos >= 1
        assert set(config) <= {"id_token", "image_resolution_buckets", "video_resolution_buckets", "rename_columns",
                               "drop_columns", "reshape_mode", "remove_common_llm_caption_prefixes"}
    return configs


def test_finetrainers_command_names_a_dataset_config_it_accepts(models, tmp_path, capsys):
    cfg, info, meta = _job(models["wan"], "dist", prompts=True)
    zeros = np.zeros((2, *_latent_shape(info)), np.float16)
    _write_output(tmp_path / "out", cfg, meta, {"latents_mean": zeros, "latents_logvar": zeros,
                                                "prompt_embeds": _prompts(np.random.default_rng(10), [3, 4])})
    code, err = _export(tmp_path / "out", tmp_path / "dest", "finetrainers", capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "dest" / ex.MARKER).read_text())
    config_path = str(tmp_path / "dest" / "finetrainers-dataset.json")
    assert f"--dataset_config {config_path} " in summary["use"]
    assert f"--precomputation_reuse --precomputation_dir {tmp_path / 'dest'} " in summary["use"]
    finetrainers_start(config_path)
    assert len(finetrainers_load(str(tmp_path / "dest"), "latent")) == 2


def test_cogvideox_text_length_other_than_226_exits_1(models, tmp_path, capsys):
    cfg, info, meta = _job(models["cogvideox"], "dist", prompts=True)  # TEXT_LEN tokens, not 226
    zeros = np.zeros((1, *_latent_shape(info)), np.float16)
    _write_output(tmp_path / "out", cfg, meta, {"latents_mean": zeros, "latents_logvar": zeros,
                                                "prompt_embeds": _prompts(np.random.default_rng(11), [3])})
    code, err = _export(tmp_path / "out", tmp_path / "dest", "finetrainers", capsys)
    assert code == 1
    assert "CogVideoX-2b's transformer adds a position embedding sized for 226 text tokens" in err
    assert "CogVideoX-5b, with rotary embeddings" in err


@pytest.mark.parametrize("fmt, model", [("musubi", "wan"), ("finetrainers", "cogvideox")])
def test_refuses_latents_the_transformer_cannot_patchify(models, tmp_path, capsys, fmt, model):
    """72 rows -> a 9-row latent: the 2x2 patch embedding floors it and the unpatchify gives 8 back
    (musubi wan/modules/model.py:641, :929-934 @ 30c658c; diffusers cogvideox_transformer_3d.py:238)."""
    cfg, info, meta = _job(models[model], "dist", height=72)
    t, c, h, w = info.latent_shape(NUM_FRAMES, 72, SIZE)
    assert h % 2  # what the trainer's patchify cannot take
    zeros = np.zeros((1, t, c, h, w), np.float16)
    _write_output(tmp_path / "out", cfg, meta, {"latents_mean": zeros, "latents_logvar": zeros})
    code, err = _export(tmp_path / "out", tmp_path / "dest", fmt, capsys)
    assert code == 2 and f"64x72 frames give {w}x{h} latents" in err and "multiples of 16" in err
    assert "64, 80" in err  # the sizes near 72 that work
    assert not (tmp_path / "dest").exists()


def test_encode_and_plan_warn_of_sizes_the_transformers_cannot_patchify(models, capsys):
    from pipeline import cli

    info = inspect_model(models["wan"])
    for sizes, bad in ((((72, 64),), True), (((64, 64), (48, 80)), False), (((64, 64), (40, 64)), True)):
        cfg = Config(input="in", output="out", model=models["wan"], num_frames=NUM_FRAMES, height=sizes[0][0],
                     width=sizes[0][1], buckets=sizes if len(sizes) > 1 else ())
        cli._warn_unpatchifiable(cfg, info)
        err = capsys.readouterr().err
        assert ("warning:" in err) == bad, err
        if bad:
            assert "--format musubi / finetrainers` will refuse them" in err
    assert not ex.unpatchifiable_warnings("AutoencoderKLLTXVideo", 32, [(96, 96)])  # patch_size 1


def test_rerun_replaces_only_its_own_files(models, tmp_path, capsys):
    """OUTPUT redone with fewer, other clips: the rerun leaves no file of the old clips, which
    musubi's glob would train on; a file the export did not write is refused, never deleted."""
    cfg, info, meta = _job(models["wan"], "mode", prompts=True)
    rng = np.random.default_rng(12)

    def output(n, seed):
        if (tmp_path / "out").exists():
            import shutil
            shutil.rmtree(tmp_path / "out")
        return _write_output(tmp_path / "out", cfg, meta, {
            "latents": rng.standard_normal((n, *_latent_shape(info))).astype(np.float16),
            "prompt_embeds": _prompts(rng, [3] * n), "caption": [f"c{i}" for i in range(n)]}, seed=seed)

    output(3, "old")
    assert _export(tmp_path / "out", tmp_path / "dest", "musubi", capsys)[0] == 0
    new = output(2, "new")
    assert _export(tmp_path / "out", tmp_path / "dest", "musubi", capsys)[0] == 0
    batch = musubi_load(str(tmp_path / "dest"), "wan")[(SIZE, SIZE, NUM_FRAMES)]
    assert batch["latents"].shape[0] == 2
    assert sorted(f.split("_")[0] for f in os.listdir(tmp_path / "dest") if f.endswith("_wan.safetensors")) == \
        sorted(new)
    assert len(_jsonl(tmp_path / "dest")) == 2
    (tmp_path / "dest" / "mine_00000-009_0064x0064_wan.safetensors").write_bytes(b"x")
    code, err = _export(tmp_path / "out", tmp_path / "dest", "musubi", capsys)
    assert code == 2 and "did not write" in err and "mine_00000-009_0064x0064_wan.safetensors" in err
    assert (tmp_path / "dest" / "mine_00000-009_0064x0064_wan.safetensors").exists()


def test_interrupted_finetrainers_rerun_is_never_trained_on(models, tmp_path, capsys, monkeypatch):
    """A rerun over fewer, other clips killed after its first item: finetrainers' command refuses
    to start (no dataset config) instead of pairing old conditions with new latents; the next rerun
    leaves exactly the new pairs."""
    cfg, info, meta = _job(models["wan"], "dist", prompts=True)
    rng = np.random.default_rng(13)

    def output(n, seed):
        import shutil
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        mean = rng.standard_normal((n, *_latent_shape(info))).astype(np.float16)
        prompts = _prompts(rng, [3] * n)
        _write_output(tmp_path / "out", cfg, meta, {"latents_mean": mean, "latents_logvar": mean,
                                                    "prompt_embeds": prompts}, seed=seed)
        return mean, prompts

    output(3, "old")
    assert _export(tmp_path / "out", tmp_path / "dest", "finetrainers", capsys)[0] == 0
    mean, prompts = output(2, "new")
    hooks = Hooks()
    try:
        hooks.arm("export-item", "raise", first=2, fault={"type": "OSError", "errno": 5})
        for name, value in hooks.env.items():  # restored afterwards: later tests' hooks need the session's
            monkeypatch.setenv(name, value)
        with pytest.raises(OSError):
            ex.export_command(str(tmp_path / "out"), str(tmp_path / "dest"), "finetrainers", None)
        assert hooks.arrivals("export-item") == 2
    finally:
        monkeypatch.undo()
        hooks.close()
    assert not (tmp_path / "dest" / "finetrainers-dataset.json").exists()  # finetrainers will not start
    assert _export(tmp_path / "out", tmp_path / "dest", "finetrainers", capsys)[0] == 0
    finetrainers_start(str(tmp_path / "dest" / "finetrainers-dataset.json"))
    latents = finetrainers_load(str(tmp_path / "dest"), "latent")
    conditions = finetrainers_load(str(tmp_path / "dest"), "condition")
    assert len(latents) == len(conditions) == 2
    for i in range(2):  # each index pairs a clip with its own caption's states
        assert torch.equal(torch.chunk(latents[i]["latents"], 2, dim=1)[0][0],
                           torch.from_numpy(mean[i]).permute(1, 0, 2, 3))
        assert torch.equal(conditions[i]["encoder_hidden_states"], torch.from_numpy(prompts[i:i + 1]))


def test_musubi_refuses_a_name_its_loader_cannot_parse(models, tmp_path, capsys):
    """A negative start frame (an OUTPUT from before decoding clamped it) becomes `_-0001-009_`,
    on which musubi's int() fails for the whole dataset (image_video_dataset.py:872-873 @ 30c658c)."""
    cfg, info, meta = _job(models["wan"], "mode", prompts=True)
    _write_output(tmp_path / "out", cfg, meta, {"latents": np.zeros((1, *_latent_shape(info)), np.float16),
                                                "prompt_embeds": _prompts(np.random.default_rng(14), [3])})
    table = pq.read_table(tmp_path / "out" / "latents" / "part-000.parquet")
    table = table.set_column(table.schema.get_field_index("start_frame"), "start_frame",
                             pa.array([-1], table.schema.field("start_frame").type))
    pq.write_table(table, tmp_path / "out" / "latents" / "part-000.parquet")
    code, err = _export(tmp_path / "out", tmp_path / "dest", "musubi", capsys)
    assert code == 2 and "cannot parse back" in err and "-0001-009" in err
    assert not (tmp_path / "dest").exists()


def test_incomplete_output_is_refused_unless_allowed(models, tmp_path, capsys):
    cfg, info, meta = _job(models["wan"], "dist", prompts=True)
    zeros = np.zeros((1, *_latent_shape(info)), np.float16)
    _write_output(tmp_path / "out", cfg, meta, {"latents_mean": zeros, "latents_logvar": zeros,
                                                "prompt_embeds": _prompts(np.random.default_rng(15), [3])},
                  complete=False)
    code, err = _export(tmp_path / "out", tmp_path / "dest", "finetrainers", capsys)
    assert code == 2 and "no _SUCCESS" in err and "--allow-incomplete" in err
    assert not (tmp_path / "dest").exists()
    assert ex.export_command(str(tmp_path / "out"), str(tmp_path / "dest"), "finetrainers", None, True) == 0
    assert json.loads((tmp_path / "dest" / ex.MARKER).read_text())["output_complete"] is False
