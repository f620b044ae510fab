"""Prompt embeddings, image-to-video latents and the stored-latents check (issue 12).

Tiny random-weight text encoders from transformers' own classes and a tokenizer trained here
(pipeline.samples.make_tiny_text_encoder), loaded through ``from_pretrained`` like real weights;
each family's embeddings are compared with a direct transformers computation written from the
family's diffusers pipeline (not by calling it), and the image latents with a direct diffusers
encode of the first frame.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import samples, stats
from pipeline.config import Config, validate
from pipeline.schema import METADATA_KEY, PROMPT_EMBEDS, PROMPT_MASK
from tests.conftest import HEIGHT, NUM_FRAMES, WIDTH, decode_all_rgb
from tests.test_families import TINY, _save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# family -> (VAE in test_families.TINY, text encoder kind, diffusers' default length, mask passed
# to the encoder, mask returned, Wan's zeroed padding)
FAMILIES = {
    "CogVideoX": ("AutoencoderKLCogVideoX", "t5", 226, False, False, False),
    "Mochi": ("AutoencoderKLMochi", "t5", 256, True, True, False),
    "LTX-Video": ("AutoencoderKLLTXVideo", "t5", 128, False, True, False),
    "Wan": ("AutoencoderKLWan", "umt5", 512, True, False, True),
}


def _model(folder, family: str) -> str:
    vae_class, kind = FAMILIES[family][:2]
    config, frames, _ = TINY[vae_class]
    _save(vae_class, config, str(folder))
    return samples.make_tiny_text_encoder(str(folder), kind)


def _expected(model: str, family: str, captions: list[str], length: int):
    """The family pipeline's _get_t5_prompt_embeds, written out with transformers."""
    import ftfy  # noqa: F401 - WanPipeline's prompt_clean needs it, as diffusers does
    import html
    import re

    import transformers

    _, kind, _, mask_in, mask_out, trim = FAMILIES[family]
    tokenizer = transformers.T5TokenizerFast.from_pretrained(model, subfolder="tokenizer")
    cls = transformers.UMT5EncoderModel if kind == "umt5" else transformers.T5EncoderModel
    encoder = cls.from_pretrained(model, subfolder="text_encoder").eval()
    if family == "Wan":  # prompt_clean: ftfy, html unescape twice, collapse whitespace
        import ftfy
        captions = [re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(c))).strip()).strip()
                    for c in captions]
    t = tokenizer(captions, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                  return_tensors="pt")
    with torch.no_grad():
        out = encoder(t.input_ids, attention_mask=t.attention_mask if mask_in else None).last_hidden_state
    if trim:
        out = out * t.attention_mask[..., None]
    return out.numpy(), (t.attention_mask.numpy().astype(np.uint8) if mask_out else None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompt_embeddings_are_the_family_pipelines(family, tmp_path):
    """Default length from the pipeline; embeddings (and the mask where the pipeline has one) equal
    the direct computation; an identical caption is encoded once; an empty caption gets its own."""
    from actors.text import TextEncoder

    model = _model(tmp_path / "m", family)
    os.makedirs(tmp_path / "in")
    samples.write_video(str(tmp_path / "in" / "v.mp4"), samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH))
    frames = TINY[FAMILIES[family][0]][1]
    cfg, info = validate(Config(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=model,
                                num_frames=frames, height=HEIGHT, width=WIDTH, text_embeddings=True,
                                latent_dtype="float32", device="cpu"))
    assert info.text.max_sequence_length == FAMILIES[family][2]
    assert info.text.attention_mask == FAMILIES[family][4]
    captions = [samples.CAPTIONS[0], samples.CAPTIONS[1], samples.CAPTIONS[0], ""]
    actor = TextEncoder(cfg, info.text)
    calls = []
    actor.embed = (lambda embed: lambda c: calls.append(list(c)) or embed(c))(actor.embed)
    out = actor({"caption": np.array(captions, dtype=object), "clip_id": np.array(["a", "b", "c", "d"])})
    assert calls == [[samples.CAPTIONS[0], samples.CAPTIONS[1], ""]]  # each caption once
    want, mask = _expected(model, family, captions, FAMILIES[family][2])
    got = out[PROMPT_EMBEDS]
    assert got.shape == (4, FAMILIES[family][2], 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if mask is None:
        assert PROMPT_MASK not in out
    else:
        np.testing.assert_array_equal(out[PROMPT_MASK], mask)


def _run(args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", "encode", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def test_one_pass_gives_latents_prompt_embeds_and_image_latents(tmp_path):
    """The CLI end to end on CogVideoX (its invert_scale_latents set, as CogVideoX 1.5): each row
    carries its caption, the prompt embeddings and the first frame's latents divided by the
    scaling factor; a video without a caption is an error row that says so; the metadata names
    the text encoder; and a rerun with another text setting is refused."""
    import diffusers

    model = _model(tmp_path / "m", "CogVideoX")
    src = tmp_path / "in"
    for i, name in enumerate(["a", "b", "nocap"]):
        samples.write_video(str(src / f"{name}.mp4"), samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH, seed=i))
    (src / "a.txt").write_text(samples.CAPTIONS[2] + "\n")
    (src / "b.txt").write_text(samples.CAPTIONS[3])
    out = tmp_path / "out"
    common = [src, out, "--model", model, "--num-frames", NUM_FRAMES, "--height", HEIGHT, "--width", WIDTH,
              "--latent-dtype", "float32", "--text-embeddings", "--image-latents"]
    proc = _run(common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["clips"] == 2 and summary["errors"] == 1 and summary["latent_check"]["checked"]

    errors = pq.read_table(out / "errors").to_pylist()
    assert [(e["error_type"], e["error_class"], e["retryable"]) for e in errors] == [("NoCaption", "input", False)]
    assert "nocap.txt" in errors[0]["message"]

    table = pq.read_table(out / "latents")
    rows = {os.path.basename(r["source_uri"]): r for r in table.to_pylist()}
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    assert meta["text_encoder"]["max_sequence_length"] == 226
    assert meta["text_encoder"]["pipeline"] == "CogVideoXPipeline"
    assert "invert_scale_latents" in meta["image_latents"]["normalization"]
    want, _ = _expected(model, "CogVideoX", [samples.CAPTIONS[2], samples.CAPTIONS[3]], 226)
    vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(model, subfolder="vae").eval()
    for j, name in enumerate(["a", "b"]):
        row = rows[f"{name}.mp4"]
        assert row["caption"] == samples.CAPTIONS[2 + j]
        np.testing.assert_allclose(np.asarray(row[PROMPT_EMBEDS]).reshape(226, 16), want[j], rtol=1e-4, atol=1e-5)
        first = torch.from_numpy(decode_all_rgb(str(src / f"{name}.mp4"))[:1]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        with torch.no_grad():
            z = vae.encode(first).latent_dist.mode() / vae.config.scaling_factor  # invert_scale_latents
        image = np.asarray(row["image_latents"]).reshape(1, *z.shape[1:2], *z.shape[3:])
        np.testing.assert_allclose(image, z.permute(0, 2, 1, 3, 4)[0].numpy(), rtol=1e-3, atol=1e-4)

    refused = _run([*common, "--text-max-length", 64])
    assert refused.returncode == 2 and "--text-embeddings" in refused.stderr, refused.stderr[-2000:]


def test_manifest_captions_and_their_column(tmp_path):
    """A manifest's caption column (named with --caption-column) gives each clip its caption; the
    column is kept as the manifest's own too. An empty or whitespace-only cell is a missing
    caption, as the README says: the .txt beside the video, and without one a NoCaption row (a
    CSV reader gives "" for an empty cell, which once got the empty prompt's embeddings)."""
    import csv

    model = _model(tmp_path / "m", "CogVideoX")
    for i in range(4):
        samples.write_video(str(tmp_path / f"v{i}.mp4"), samples.synthetic_frames(NUM_FRAMES, HEIGHT, WIDTH, seed=i))
    (tmp_path / "v1.txt").write_text(samples.CAPTIONS[4] + "\n")
    (tmp_path / "v2.txt").write_text(samples.CAPTIONS[5])
    cells = [samples.CAPTIONS[0], "", "  \t ", ""]  # v3: an empty cell and no .txt
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["uri", "text"], *([f"v{i}.mp4", c] for i, c in enumerate(cells))])
    proc = _run([tmp_path / "out", "--manifest", manifest, "--model", model, "--num-frames", NUM_FRAMES,
                 "--height", HEIGHT, "--width", WIDTH, "--latent-dtype", "float32", "--text-embeddings",
                 "--caption-column", "text"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {os.path.basename(r["source_uri"]): r for r in pq.read_table(tmp_path / "out" / "latents").to_pylist()}
    captions = [samples.CAPTIONS[0], samples.CAPTIONS[4], samples.CAPTIONS[5]]
    assert [(rows[f"v{i}.mp4"]["caption"], rows[f"v{i}.mp4"]["text"]) for i in range(3)] == \
        list(zip(captions, cells[:3]))
    want, _ = _expected(model, "CogVideoX", captions, 226)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(rows[f"v{i}.mp4"][PROMPT_EMBEDS]).reshape(226, 16), want[i],
                                   rtol=1e-4, atol=1e-5)
    (error,) = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert (os.path.basename(error["source_uri"]), error["error_type"], error["error_class"], error["retryable"]) \
        == ("v3.mp4", "NoCaption", "input", False)
    assert "empty 'text' cell" in error["message"] and "v3.txt" in error["message"]


def test_a_caption_column_the_manifest_lacks_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """--caption-column naming no column of the manifest exits 2 before Ray starts, in one line
    naming the column and the manifest's columns; so does --caption-column without a manifest.
    The default column may be absent: then each video's .txt is its caption."""
    from pipeline import cluster
    from pipeline.cli import main

    monkeypatch.setattr(cluster, "connect_ray", lambda *a, **kw: pytest.fail("Ray was started"))
    model = _model(tmp_path / "m", "CogVideoX")
    (tmp_path / "in").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,caption,id\nv.mp4,a cat,1\n")
    capsys.readouterr()  # the model's save wrote progress bars
    shape = ["--model", model, "--num-frames", TINY[FAMILIES["CogVideoX"][0]][1], "--height", HEIGHT,
             "--width", WIDTH, "--text-embeddings"]
    for args, message in [
        ([tmp_path / "out", "--manifest", manifest, "--caption-column", "nope"],
         f"--manifest {manifest}: no column 'nope' for --caption-column (it has uri, caption, id)"),
        ([tmp_path / "in", tmp_path / "out", "--caption-column", "caption"], "it needs --manifest")]:
        assert main(["encode", *map(str, args), *map(str, shape)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()

    (tmp_path / "bare.csv").write_text("uri,id\nv.mp4,1\n")
    cfg, _ = validate(Config(input=None, manifest=str(tmp_path / "bare.csv"), output=str(tmp_path / "out"),
                             model=model, num_frames=TINY[FAMILIES["CogVideoX"][0]][1], height=HEIGHT,
                             width=WIDTH, text_embeddings=True))
    assert cfg.caption_field == "caption" and cfg.extra_columns == (("id", "int64"),)


def test_stored_latents_check_warns_when_off():
    rng = np.random.default_rng(0)
    good = rng.standard_normal((8, 3, 4, 5, 5))
    total = stats.merge(stats.moments(good[:4]), stats.moments(good[4:]))
    ok = stats.check(total, has_statistics=True, latent_mode="mode")
    assert ok["checked"] and not ok["warnings"] and abs(ok["overall_std"] - 1) < 0.1
    assert len(ok["mean"]) == 4
    scaled = stats.check(stats.moments(good * 3 + 1), has_statistics=True, latent_mode="mode")
    assert scaled["warnings"] and "channel" in scaled["warnings"][0]
    tiny = stats.check(stats.moments(good * 0.01), has_statistics=False, latent_mode="sample")
    assert tiny["warnings"] and "scaling factor" in tiny["warnings"][0]
    bad = good.copy()
    bad[0, 0, 0, 0, 0] = np.nan
    assert stats.check(stats.moments(bad), True, "mode")["nonfinite_values"] == 1
    assert not stats.check(total, True, "dist")["checked"]


def _text_encoder_with_limited_memory(actor, fits) -> list:
    """Make the actor's real text encoder raise CUDA's out-of-memory error unless
    ``fits(input_ids)``, as a GPU shared with a VAE actor would; returns the batch sizes it was
    called with (as tests/test_encoder.py does to the VAE)."""
    encoder, calls = actor.view.text_encoder, []
    real_forward = encoder.forward

    def forward(input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        if not fits(input_ids):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(input_ids, *args, **kwargs)

    encoder.forward = forward
    return calls


def test_text_encoder_out_of_memory_halves_then_goes_caption_by_caption(tmp_path):
    """Out of memory above two captions, the actor halves its batch, then goes one caption at a
    time, with the embeddings of a run that never failed; a caption that alone does not fit gives
    its clip the row the VAE's ladder gives a clip that does not fit (retryable, class resource),
    and the other clips go on with all their columns."""
    import pyarrow.parquet as pq

    from actors.text import TextEncoder

    model = _model(tmp_path / "m", "Mochi")  # a mask too: both tensors follow the kept rows
    cfg, info = validate(Config(input=str(tmp_path / "m"), output=str(tmp_path / "out"), model=model,
                                num_frames=TINY[FAMILIES["Mochi"][0]][1], height=HEIGHT, width=WIDTH,
                                text_embeddings=True, latent_dtype="float32", device="cpu"))
    captions = [c + " " + w for c in samples.CAPTIONS for w in ("today", "again")][:5]
    batch = {"caption": np.array(captions, dtype=object),
             "clip_id": np.array([f"c{i}" for i in range(5)], dtype=object),
             "source_uri": np.array([f"v{i}.mp4" for i in range(5)], dtype=object),
             "latents": np.arange(5, dtype=np.float32)[:, None]}
    clean = TextEncoder(cfg, info.text)(dict(batch))

    actor = TextEncoder(cfg, info.text)
    calls = _text_encoder_with_limited_memory(actor, lambda ids: ids.shape[0] <= 2)
    out = actor(dict(batch))
    assert calls == [5, 2, 3, 1, 2]  # 5 fails; halves of 2 and 3; the 3 fails; then 1 and 2
    np.testing.assert_array_equal(out[PROMPT_MASK], clean[PROMPT_MASK])
    np.testing.assert_allclose(out[PROMPT_EMBEDS], clean[PROMPT_EMBEDS], rtol=1e-5, atol=1e-6)

    big = actor.view.tokenizer(captions[3], padding="max_length", max_length=info.text.max_sequence_length,
                               truncation=True, return_tensors="pt").input_ids
    actor = TextEncoder(cfg, info.text)
    calls = _text_encoder_with_limited_memory(
        actor, lambda ids: ids.shape[0] == 1 and not torch.equal(ids, big))
    out = actor(dict(batch))
    assert sorted(calls).count(1) == 5  # every caption tried alone
    assert list(out["clip_id"]) == ["c0", "c1", "c2", "c4"] and list(out["latents"][:, 0]) == [0, 1, 2, 4]
    keep = [0, 1, 2, 4]
    np.testing.assert_allclose(out[PROMPT_EMBEDS], clean[PROMPT_EMBEDS][keep], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[PROMPT_MASK], clean[PROMPT_MASK][keep])
    (row,) = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert (row["source_uri"], row["clip_id"], row["error_type"], row["error_class"], row["retryable"]) == \
        ("v3.mp4", "c3", "OutOfMemory", "resource", True)
    assert captions[3] not in actor.cache  # tried afresh by the next batch that has it


def test_the_vae_batch_search_is_sized_to_the_actors_share_of_the_gpu():
    """The VAE actor's batch search stops at its own share of the GPU (Ray's fractional
    num_gpus), not the whole device's memory, and never above what the process can get now."""
    from actors.encoder import VAEEncoder, batch_memory_budget, device_share
    from pipeline.config import GPU_MEMORY_HEADROOM

    gib = 1 << 30
    keep = 1 - GPU_MEMORY_HEADROOM
    assert batch_memory_budget(80 * gib, 80 * gib, 0, 1.0) == keep * 80 * gib  # alone on the device
    assert batch_memory_budget(80 * gib, 79 * gib, 2 * gib, 0.75) == keep * 60 * gib  # its share
    assert batch_memory_budget(80 * gib, 30 * gib, 2 * gib, 0.75) == keep * 32 * gib  # less is free now

    def share(**kw):
        cfg = Config(input="i", output="o", model="m", device="cuda", **kw)
        return device_share(VAEEncoder.ray_options(cfg)["num_gpus"])

    assert share() == 1.0
    assert share(text_embeddings=True) == 0.75  # --text-gpus 0.25 is the text actor's
    assert share(gpus_per_actor=0.5, text_embeddings=True, text_gpus=0.5) == 0.25
    assert share(gpus_per_actor=2) == 1.0  # two whole GPUs: it computes on the first, alone


# LTX-2 and the HunyuanVideos (issue 22): tiny text encoders of the real classes (tests/tiny_text.py),
# each family's embeddings against a direct computation written from its diffusers 0.42.1 pipeline.
def _rel_l2(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _embed(folder: str, vae_class: str, captions: list[str], **kw):
    """The text inspection of ``folder`` (its model_index.json) and the text actor's output."""
    from actors.text import TextEncoder
    from pipeline.text import inspect_text

    cfg = Config(input=folder, output=os.path.join(folder, "out"), model=folder, text_embeddings=True,
                 latent_dtype="float32", device="cpu", **kw)
    info = inspect_text(cfg, vae_class)
    actor = TextEncoder(cfg, info)
    n = len(captions)
    return info, actor, actor({"caption": np.array(captions, dtype=object), "clip_id": np.arange(n).astype(str)})


def test_hunyuan_video_prompt_embeddings_are_its_encode_prompts(tmp_path):
    """HunyuanVideoPipeline.encode_prompt, once refused: the Llama's hidden states from the third
    layer from the end after the prompt template, the template's tokens cropped, 256 tokens with
    their mask, and CLIP-L's pooled output; validated from the model folder (the VAE family exists),
    with the family's --text-gpus (0.5) unless one is given."""
    import transformers
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    from tests import tiny_text

    model = tiny_text.make_hunyuan_video(str(tmp_path / "m"))
    _save("AutoencoderKLHunyuanVideo", TINY["AutoencoderKLHunyuanVideo"][0], model)
    os.makedirs(tmp_path / "in")
    base = dict(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=model, height=HEIGHT, width=WIDTH,
                num_frames=TINY["AutoencoderKLHunyuanVideo"][1], text_embeddings=True, device="cpu")
    cfg, info = validate(Config(**base))
    assert (info.text.pipeline, cfg.text_gpus) == ("HunyuanVideoPipeline", 0.5)
    assert validate(Config(**base, text_gpus=0.3))[0].text_gpus == 0.3

    captions = [samples.CAPTIONS[0], samples.CAPTIONS[3] + " " + samples.CAPTIONS[4], ""]
    _, _, out = _embed(model, "AutoencoderKLHunyuanVideo", captions)

    # diffusers/pipelines/hunyuan_video/pipeline_hunyuan_video.py (0.42.1), _get_llama_prompt_embeds
    # lines 199-263: template.format(prompt), crop_start 95 from DEFAULT_PROMPT_TEMPLATE (70-82),
    # padded to 256 + crop_start, hidden_states[-(2 + 1)], then [:, crop_start:] for states and mask
    tokenizer = transformers.LlamaTokenizerFast.from_pretrained(model, subfolder="tokenizer")
    llama = transformers.LlamaModel.from_pretrained(model, subfolder="text_encoder").eval()
    crop = DEFAULT_PROMPT_TEMPLATE["crop_start"]
    t = tokenizer([DEFAULT_PROMPT_TEMPLATE["template"].format(c) for c in captions], max_length=256 + crop,
                  padding="max_length", truncation=True, return_tensors="pt", return_attention_mask=True)
    # _get_clip_prompt_embeds, lines 265-302: padded to 77 (encode_prompt, line 333), pooler_output
    clip_tokenizer = transformers.CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")
    clip = transformers.CLIPTextModel.from_pretrained(model, subfolder="text_encoder_2").eval()
    c = clip_tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = llama(input_ids=t.input_ids, attention_mask=t.attention_mask, output_hidden_states=True).hidden_states
        pooled = clip(c.input_ids).pooler_output
    assert out[PROMPT_EMBEDS].shape == (3, 256, 16) and out["pooled_prompt_embeds"].shape == (3, 12)
    assert _rel_l2(out[PROMPT_EMBEDS], states[-3][:, crop:]) <= 1e-4
    np.testing.assert_array_equal(out[PROMPT_MASK], t.attention_mask[:, crop:].numpy())
    assert _rel_l2(out["pooled_prompt_embeds"], pooled) <= 1e-4


def test_hunyuan_video_15_prompt_embeddings_are_its_encode_prompts(tmp_path):
    """HunyuanVideo15Pipeline.encode_prompt: Qwen2.5-VL's states after its chat template (1000
    tokens past the 108 cropped) with their mask, and ByT5's embeddings of the prompt's quoted
    text (zeros and a zero mask when it has none), in columns of their own. The VAE family is not
    on this branch: the text inspection reads the folder's model_index.json."""
    import re

    import diffusers
    import transformers

    from tests import tiny_text

    model = tiny_text.make_hunyuan_video_15(str(tmp_path / "m"))
    captions = [samples.CAPTIONS[1], tiny_text.GLYPH_CAPTION, ""]
    info, actor, out = _embed(model, "AutoencoderKLHunyuanVideo15", captions)
    assert info.pipeline == "HunyuanVideo15Pipeline" and info.default_gpus == 0.5

    tokenizer = transformers.Qwen2Tokenizer.from_pretrained(model, subfolder="tokenizer")
    qwen = transformers.Qwen2_5_VLTextModel.from_pretrained(model, subfolder="text_encoder").eval()
    byt5_tokenizer = transformers.ByT5Tokenizer.from_pretrained(model, subfolder="tokenizer_2")
    byt5 = transformers.T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2").eval()
    # What the pipeline's __init__ sets for encode_prompt (pipeline_hunyuan_video1_5.py, 0.42.1,
    # lines 221-233), read from a real instance, equal what the actor's view carries.
    vae = diffusers.AutoencoderKLHunyuanVideo15(block_out_channels=(8,) * 5, layers_per_block=1,
                                               latent_channels=4)
    pipe = diffusers.HunyuanVideo15Pipeline(text_encoder=qwen, tokenizer=tokenizer, transformer=None, vae=vae,
                                            scheduler=None, text_encoder_2=byt5, tokenizer_2=byt5_tokenizer,
                                            guider=None)
    names = ("tokenizer_max_length", "system_message", "prompt_template_encode_start_idx", "tokenizer_2_max_length")
    assert {n: getattr(actor.view, n) for n in names} == {n: getattr(pipe, n) for n in names}

    # _get_mllm_prompt_embeds, lines 241-287, with format_text_input (64-80): system and user
    # messages (" " for an empty prompt), the chat template with the generation prompt, padded to
    # max length + crop_start, hidden_states[-(2 + 1)], then [:, crop_start:]
    crop, length = pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length
    chats = [[{"role": "system", "content": pipe.system_message}, {"role": "user", "content": c or " "}]
             for c in captions]
    t = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      padding="max_length", max_length=length + crop, truncation=True,
                                      return_tensors="pt")
    with torch.no_grad():
        states = qwen(input_ids=t.input_ids, attention_mask=t.attention_mask, output_hidden_states=True).hidden_states
    assert out[PROMPT_EMBEDS].shape == (3, 1000, 16)
    assert _rel_l2(out[PROMPT_EMBEDS], states[-3][:, crop:]) <= 1e-4
    np.testing.assert_array_equal(out[PROMPT_MASK], t.attention_mask[:, crop:].numpy())

    # _get_byt5_prompt_embeds, lines 289-332, with extract_glyph_texts (83-104): the quoted texts
    # as 'Text "...". ', padded to 256, the encoder's first output; none: zeros and a zero mask
    want, masks = np.zeros((3, 256, 8), np.float32), np.zeros((3, 256), np.uint8)
    for i, caption in enumerate(captions):
        quoted = [a or b for a, b in re.findall(r"\"(.*?)\"|“(.*?)”", caption)]
        if quoted:
            glyph = ". ".join(f'Text "{q}"' for q in quoted) + ". "
            g = byt5_tokenizer(glyph, padding="max_length", max_length=256, truncation=True, add_special_tokens=True,
                               return_tensors="pt")
            with torch.no_grad():
                want[i] = byt5(input_ids=g.input_ids, attention_mask=g.attention_mask.float())[0][0].numpy()
            masks[i] = g.attention_mask[0].numpy()
    assert masks[1].any() and not masks[0].any()
    assert _rel_l2(out["prompt_embeds_2"], want) <= 1e-4 and not out["prompt_embeds_2"][[0, 2]].any()
    np.testing.assert_array_equal(out["prompt_attention_mask_2"], masks)


@pytest.mark.parametrize("per_modality", [False, True], ids=["LTX-2.0", "LTX-2.3"])
def test_ltx2_prompt_embeddings_are_the_trainers_features(tmp_path, per_modality):
    """LTX2Pipeline._get_gemma_prompt_embeds (every Gemma 3 hidden state, left-padded to 1024),
    then its connectors' text projection: what the LTX-2 trainer caches (the connector
    transformers run in training). LTX-2.3's per-modality projections give audio_prompt_embeds
    too. The VAE family is not on this branch: the inspection reads model_index.json."""
    import transformers
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    from tests import tiny_text

    model = tiny_text.make_ltx2(str(tmp_path / "m"), per_modality=per_modality)
    captions = ["  " + samples.CAPTIONS[2], samples.CAPTIONS[5], ""]
    info, _, out = _embed(model, "AutoencoderKLLTX2Video", captions)
    assert (info.pipeline, info.max_sequence_length, info.default_gpus) == ("LTX2Pipeline", 1024, 0.5)

    # diffusers/pipelines/ltx2/pipeline_ltx2.py (0.42.1), _get_gemma_prompt_embeds lines 303-365:
    # left padding, stripped prompts, padded to 1024, every hidden state stacked on a last axis
    tokenizer = transformers.GemmaTokenizerFast.from_pretrained(model, subfolder="tokenizer")
    tokenizer.padding_side = "left"
    gemma = transformers.Gemma3ForConditionalGeneration.from_pretrained(model, subfolder="text_encoder").eval()
    connectors = LTX2TextConnectors.from_pretrained(model, subfolder="connectors").eval()
    t = tokenizer([c.strip() for c in captions], padding="max_length", max_length=1024, truncation=True,
                  add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        h = torch.stack(gemma(input_ids=t.input_ids, attention_mask=t.attention_mask,
                              output_hidden_states=True).hidden_states, dim=-1)  # [B, L, D, layers]
    b, length, d, _ = h.shape
    mask = t.attention_mask
    if not per_modality:
        # connectors.py per_layer_masked_mean_norm (lines 12-78), left padding, scale 8, eps 1e-6;
        # then text_proj_in (forward, lines 443-452)
        lengths = mask.sum(-1)
        valid = (torch.arange(length)[None] >= length - lengths[:, None])[:, :, None, None]
        mean = h.masked_fill(~valid, 0).sum(dim=(1, 2), keepdim=True) / ((lengths * d).view(b, 1, 1, 1) + 1e-6)
        lo = h.masked_fill(~valid, float("inf")).amin(dim=(1, 2), keepdim=True)
        hi = h.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
        x = ((h - mean) / (hi - lo + 1e-6) * 8).flatten(2).masked_fill(~valid[..., 0], 0)
        want = {PROMPT_EMBEDS: x @ connectors.text_proj_in.weight.T}
    else:
        # per_token_rms_norm (lines 81-84), padding zeroed, each branch's scale and projection
        # (forward, lines 426-441)
        x = (h * torch.rsqrt(h.pow(2).mean(dim=2, keepdim=True) + 1e-6)).flatten(2) * mask.bool()[..., None]
        want = {PROMPT_EMBEDS: x * (24 / 16) ** 0.5 @ connectors.video_text_proj_in.weight.T,
                "audio_prompt_embeds": x * (8 / 16) ** 0.5 @ connectors.audio_text_proj_in.weight.T}
    assert set(out) == {"caption", "clip_id", PROMPT_MASK, *want}
    for name, tensor in want.items():
        assert out[name].shape == tuple(tensor.shape) and _rel_l2(out[name], tensor.detach()) <= 1e-4, name
    np.testing.assert_array_equal(out[PROMPT_MASK], mask.numpy())
