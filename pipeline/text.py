"""Prompt embeddings: which text encoder, tokenizer and diffusers pipeline a job uses, read from
the model's folders without loading weights (the driver), and the captions each input gets.

The embeddings are computed by the family's own diffusers pipeline code
(``Pipeline._get_t5_prompt_embeds``, run on the loaded tokenizer and text encoder by
``actors.text``), so the tokenizer call, the default maximum length and the mask are the
pipeline's, not copies of them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass

from pipeline import failures, model, storage
from pipeline.config import Config, redact_url

TEXT_ENCODER, TOKENIZER = "text_encoder", "tokenizer"
MODEL_INDEX = "model_index.json"
# The family's text-to-video pipeline, when the folder has no model_index.json naming one.
PIPELINES = {
    "AutoencoderKLCogVideoX": "CogVideoXPipeline",
    "AutoencoderKLMochi": "MochiPipeline",
    "AutoencoderKLLTXVideo": "LTXPipeline",
    "AutoencoderKLWan": "WanPipeline",
}
# The tokenizer's and text encoder's files as listed in TextInfo (also the S3 copy's cache key):
# each file's size and first bytes (a safetensors header lists every tensor's name, dtype, shape
# and offset). What tells two encoders' weights apart is TextInfo.encoder_weights.
HEAD_BYTES = 1 << 20


class TextError(ValueError):
    """The text encoder or tokenizer cannot be found or used with this model (exit 2)."""


class NoCaption(failures.InputError):
    """--text-embeddings and no caption for this input: final until a caption is added (then
    rerun with --retry-errors)."""

    stage = "read"


@dataclass(frozen=True)
class TextInfo:
    source: str  # the folder holding text_encoder/ and tokenizer/
    pipeline: str  # the diffusers pipeline whose _get_t5_prompt_embeds computes the embeddings
    encoder_class: str  # transformers class of text_encoder/
    tokenizer_class: str
    max_sequence_length: int
    hidden_size: int
    attention_mask: bool  # the pipeline returns (and its transformer takes) a mask
    pipeline_config: dict  # the pipeline's registered config (e.g. Mochi's force_zeros_for_empty_prompt)
    encoder_files: tuple
    tokenizer_files: tuple
    # The encoder's weights, for the job's identity: a digest of every byte of a local folder's
    # files (tens of GB: each file's digest is remembered, see model.file_digest), of the ETags on
    # S3, or a hub id's resolved commit ("unresolved" when it could not be).
    encoder_weights: str = ""
    revision: str | None = None  # a hub id's commit, which the text actors load

    def metadata(self, dtype: str) -> dict:
        return {"source": redact_url(self.source),
                "pipeline": self.pipeline, "class": self.encoder_class, "tokenizer_class": self.tokenizer_class,
                "max_sequence_length": self.max_sequence_length, "hidden_size": self.hidden_size,
                "attention_mask": self.attention_mask, "dtype": dtype,
                "computed_as": f"diffusers {self.pipeline}._get_t5_prompt_embeds"}

    def identity(self) -> dict:
        return {"pipeline": self.pipeline, "encoder": self.encoder_class, "tokenizer": self.tokenizer_class,
                "max_sequence_length": self.max_sequence_length, "config": self.pipeline_config,
                "encoder files": self.encoder_files, "tokenizer files": self.tokenizer_files}


def text_dtype(cfg: Config) -> str | None:
    """The text encoder's compute dtype: bfloat16 on CUDA (as the families' pipelines are run),
    float32 on CPU; None until the device is known."""
    return {"cuda": "bfloat16", "cpu": "float32"}.get(cfg.device)


def _read_json(source: str, path: str, s3, revision: str | None = None) -> dict | None:
    """``source``/``path`` parsed, or None when absent; a hub id's file is downloaded alone."""
    if model.looks_like_hub_id(source):
        from huggingface_hub import hf_hub_download  # a diffusers dependency

        try:
            with open(hf_hub_download(source, path, revision=revision)) as f:
                return json.load(f)
        except Exception:  # noqa: BLE001 - any hub failure means "not there"
            return None
    try:
        return json.loads(storage.read_bytes(storage.join(source, path), s3))
    except (FileNotFoundError, OSError):
        return None


def pipeline_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "_get_t5_prompt_embeds"):
        raise TextError(f"{name} is not a diffusers pipeline with T5-style prompt embeddings "
                        f"(supported: {', '.join(sorted(PIPELINES.values()))})")
    return cls


def inspect_text(cfg: Config, vae_class: str) -> TextInfo:
    """What --text-embeddings will load, from the folders' JSON files and the pipeline's code."""
    source = cfg.text_encoder or cfg.model
    hub = model.looks_like_hub_id(source)
    revision = model.hub_revision(source) if hub else None
    index = _read_json(source, MODEL_INDEX, cfg.s3, revision) or {}
    name = index.get("_class_name") or PIPELINES.get(vae_class)
    if name is None:
        raise TextError(f"--text-embeddings: no prompt-embedding recipe for {vae_class} "
                        "(HunyuanVideo's two text encoders are not supported yet: see the README)")
    cls = pipeline_class(name)
    encoder_config = _read_json(source, f"{TEXT_ENCODER}/{model.CONFIG_NAME}", cfg.s3, revision)
    if encoder_config is None:
        raise TextError(f"--text-embeddings: no {TEXT_ENCODER}/{model.CONFIG_NAME} under {source} "
                        "(give the diffusers repository's root, or --text-encoder PATH)")
    tokenizer_files = model.folder_files(source, TOKENIZER, cfg.s3, HEAD_BYTES)
    if not tokenizer_files and not hub:  # a hub id's are not listed
        raise TextError(f"--text-embeddings: no {TOKENIZER}/ under {source}")
    encoder_class = (index.get(TEXT_ENCODER) or [None, None])[1] or (encoder_config.get("architectures") or [None])[0]
    tokenizer_config = _read_json(source, f"{TOKENIZER}/tokenizer_config.json", cfg.s3, revision) or {}
    tokenizer_class = (index.get(TOKENIZER) or [None, None])[1] or tokenizer_config.get("tokenizer_class") \
        or "AutoTokenizer"
    if not encoder_class:
        raise TextError(f"--text-embeddings: {TEXT_ENCODER}/config.json names no architecture")
    params = inspect.signature(cls.__call__).parameters
    default_length = params["max_sequence_length"].default if "max_sequence_length" in params else None
    length = cfg.text_max_length or default_length
    if not length:
        raise TextError(f"--text-embeddings: {name} has no default max_sequence_length; give --text-max-length")
    init = inspect.signature(cls.__init__).parameters
    pipeline_config = {k: index.get(k, p.default) for k, p in init.items()
                       if k != "self" and p.default is not inspect.Parameter.empty
                       and isinstance(p.default, (bool, int, float, str))}
    hidden = encoder_config.get("d_model") or encoder_config.get("hidden_size")
    if hub:
        weights = f"hub commit {revision}" if revision else "unresolved (hub id: its commit could not be resolved)"
    else:
        weights = hashlib.blake2b(json.dumps(model.folder_files(source, TEXT_ENCODER, cfg.s3)).encode(),
                                  digest_size=8).hexdigest()
    return TextInfo(source=source, pipeline=name, encoder_class=encoder_class, tokenizer_class=tokenizer_class,
                    max_sequence_length=int(length), hidden_size=int(hidden),
                    attention_mask="prompt_attention_mask" in inspect.signature(cls.encode_prompt).parameters,
                    pipeline_config=pipeline_config,
                    encoder_files=model.folder_files(source, TEXT_ENCODER, cfg.s3, HEAD_BYTES),
                    tokenizer_files=tokenizer_files, encoder_weights=weights, revision=revision)


def sidecar(path: str) -> str:
    """The caption file beside a video: the same name with ``.txt``."""
    return os.path.splitext(path)[0] + ".txt"  # s3:// URIs split the same way


def caption_for(row: dict, cfg: Config) -> str:
    """The input's caption: the manifest's caption cell, else the .txt file beside the video
    (read as UTF-8, surrounding whitespace stripped).

    A cell that is empty or only whitespace is missing, as an absent one is: a CSV reader gives
    ``""`` for an empty cell, and taking it would give the clip the empty prompt's embeddings
    (Mochi's pipeline even zeroes them) instead of its caption file's. An empty ``.txt`` is a
    deliberate empty prompt (unconditional training) and is kept."""
    cell = row.get("caption")
    if cell is not None and str(cell).strip():
        return str(cell)
    path = row.get("path") or row["source_uri"]
    try:
        return storage.read_bytes(sidecar(path), cfg.s3).decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise NoCaption(f"--text-embeddings: the caption file {sidecar(path)} is not UTF-8 ({e.reason} at "
                        f"byte {e.start})") from None
    except FileNotFoundError:
        where = f"an empty {cfg.caption_field!r} cell in its manifest row and " if cfg.manifest else ""
        raise NoCaption(f"--text-embeddings: {where}no caption file {sidecar(path)}") from None
