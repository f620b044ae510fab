"""Prompt embeddings: which text encoders, tokenizers and diffusers pipeline a job uses, read from
the model's folders without loading weights (the driver), and the captions each input gets.

The embeddings are computed by the family's own diffusers pipeline code, run on the loaded
components by ``actors.text`` (see RECIPES), so the tokenizer calls, templates, crops, default
lengths and masks are the pipeline's, not copies of them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from dataclasses import dataclass

from pipeline import failures, model, storage
from pipeline.config import DEFAULT_TEXT_GPUS, Config, redact_url
from pipeline.schema import (AUDIO_PROMPT_EMBEDS, POOLED_EMBEDS, PROMPT_EMBEDS, PROMPT_EMBEDS_2, PROMPT_MASK,
                             PROMPT_MASK_2)

TEXT_ENCODER, TOKENIZER = "text_encoder", "tokenizer"
MODEL_INDEX = "model_index.json"
# The family's text-to-video pipeline, when the folder has no model_index.json naming one.
PIPELINES = {
    "AutoencoderKLCogVideoX": "CogVideoXPipeline",
    "AutoencoderKLMochi": "MochiPipeline",
    "AutoencoderKLLTXVideo": "LTXPipeline",
    "AutoencoderKLWan": "WanPipeline",
    "AutoencoderKLHunyuanVideo": "HunyuanVideoPipeline",
    "AutoencoderKLHunyuanVideo15": "HunyuanVideo15Pipeline",
    "AutoencoderKLLTX2Video": "LTX2Pipeline",
}
# How a pipeline computes its prompt embeddings, told by the method it has: recipe -> (that method,
# the components it reads beside text_encoder/ and tokenizer/, the family's default --text-gpus).
# The T5 encoders (4.7B in T5-XXL) take a quarter of each encoder slot's GPU; the 7-12B decoder
# LLMs (HunyuanVideo's Llama 3 8B, about 16 GB in bfloat16, with CLIP-L; HunyuanVideo 1.5's
# Qwen2.5-VL 7B, about 15 GB, with ByT5; LTX-2's Gemma 3 12B, about 24 GB, whose 49 hidden
# states per token it stacks) take half.
RECIPES = {
    "t5": ("_get_t5_prompt_embeds", (), DEFAULT_TEXT_GPUS),
    "llama_clip": ("_get_llama_prompt_embeds", ("text_encoder_2", "tokenizer_2"), 0.5),
    "mllm_byt5": ("_get_mllm_prompt_embeds", ("text_encoder_2", "tokenizer_2"), 0.5),
    "gemma": ("_get_gemma_prompt_embeds", ("connectors",), 0.5),
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
    pipeline: str  # the diffusers pipeline whose code (RECIPES) computes the embeddings
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
    recipe: str = "t5"  # a key of RECIPES
    # The recipe's further components: (subfolder, library, class, files) each (text_encoder_2/ and
    # tokenizer_2/ for the HunyuanVideos, connectors/ for LTX-2).
    components: tuple = ()
    # (column, shape, kind) per tensor column the text actor adds; kind "embeds" (the storage
    # dtype) or "mask" (uint8, 1 = a real token). Empty: the T5 recipe's, from the fields above.
    outputs: tuple = ()

    @property
    def columns(self) -> tuple:
        if self.outputs:
            return self.outputs
        length = self.max_sequence_length
        return ((PROMPT_EMBEDS, (length, self.hidden_size), "embeds"),
                *(((PROMPT_MASK, (length,), "mask"),) if self.attention_mask else ()))

    @property
    def default_gpus(self) -> float:
        """The family's --text-gpus when none is given (RECIPES)."""
        return RECIPES[self.recipe][2]

    def bytes_per_row(self, itemsize: int) -> int:
        return sum(math.prod(shape) * (1 if kind == "mask" else itemsize) for _, shape, kind in self.columns)

    def metadata(self, dtype: str) -> dict:
        return {"source": redact_url(self.source),
                "pipeline": self.pipeline, "class": self.encoder_class, "tokenizer_class": self.tokenizer_class,
                "max_sequence_length": self.max_sequence_length, "hidden_size": self.hidden_size,
                "attention_mask": self.attention_mask, "dtype": dtype,
                "computed_as": COMPUTED_AS[self.recipe].format(self.pipeline),
                **({"components": {sub: cls for sub, _, cls, _ in self.components}} if self.components else {}),
                "columns": {name: list(shape) for name, shape, _ in self.columns}}

    def identity(self) -> dict:
        return {"pipeline": self.pipeline, "encoder": self.encoder_class, "tokenizer": self.tokenizer_class,
                "max_sequence_length": self.max_sequence_length, "config": self.pipeline_config,
                "encoder files": self.encoder_files, "tokenizer files": self.tokenizer_files,
                # only where there are some, so that a T5 job recorded before keeps its fingerprint
                **({"components": self.components} if self.components else {})}


COMPUTED_AS = {
    "t5": "diffusers {}._get_t5_prompt_embeds",
    "llama_clip": "diffusers {}.encode_prompt (_get_llama_prompt_embeds, _get_clip_prompt_embeds)",
    "mllm_byt5": "diffusers {}.encode_prompt (_get_mllm_prompt_embeds, _get_byt5_prompt_embeds)",
    "gemma": "diffusers {}._get_gemma_prompt_embeds, then its connectors' text projection (the LTX-2 "
             "trainer's cached features, before the connector transformers)",
}


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


def recipe_of(cls) -> str | None:
    """The RECIPES key whose method ``cls`` has; None when it has none, or when its
    ``encode_prompt`` needs more than the prompt (an image-to-video pipeline's image)."""
    for recipe, (method, _, _) in RECIPES.items():
        if hasattr(cls, method):
            break
    else:
        return None
    if recipe != "t5":
        required = [name for name, p in inspect.signature(cls.encode_prompt).parameters.items()
                    if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
        if required != ["self", "prompt"]:
            return None
    return recipe


def pipeline_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or recipe_of(cls) is None:
        raise TextError(f"{name} is not a diffusers pipeline whose prompt embeddings video-latents computes "
                        f"(supported: {', '.join(sorted(PIPELINES.values()))})")
    return cls


def _component_class(source: str, sub: str, index: dict, s3, revision: str | None) -> tuple[str, str]:
    """(library, class) of a pipeline component: as model_index.json names it, else its own
    config's (a diffusers ``_class_name``, a transformers ``architectures``, a tokenizer's class)."""
    named = index.get(sub) or [None, None]
    if named[1]:
        return named[0] or "transformers", named[1]
    config = _read_json(source, f"{sub}/{model.CONFIG_NAME}", s3, revision) or {}
    if config.get("_class_name"):
        return "diffusers", config["_class_name"]
    if config.get("architectures"):
        return "transformers", config["architectures"][0]
    tokenizer = (_read_json(source, f"{sub}/tokenizer_config.json", s3, revision) or {}).get("tokenizer_class")
    if tokenizer:
        return "transformers", tokenizer
    raise TextError(f"--text-embeddings: no {sub}/ under {source} naming its class (the pipeline needs it)")


def _hidden(config: dict) -> int | None:
    """A transformers config's hidden size (a multimodal model's is its text model's)."""
    for c in (config, config.get("text_config") or {}):
        if c.get("d_model") or c.get("hidden_size"):
            return int(c.get("d_model") or c.get("hidden_size"))
    return None


def default_length(cls, recipe: str) -> int | None:
    """The pipeline's default prompt length: its ``__call__``'s max_sequence_length, or for
    HunyuanVideo 1.5 (which has none) its ``_get_mllm_prompt_embeds``' tokenizer_max_length."""
    params = inspect.signature(cls.__call__).parameters
    if "max_sequence_length" in params:
        return params["max_sequence_length"].default
    if recipe == "mllm_byt5":
        return inspect.signature(cls._get_mllm_prompt_embeds).parameters["tokenizer_max_length"].default
    return None


def _outputs(cls, recipe: str, length: int, hidden: int, components: dict) -> tuple:
    """The (column, shape, kind) the recipe adds; () for T5 (TextInfo.columns)."""
    if recipe == "llama_clip":  # encode_prompt: Llama states cropped to length, CLIP-L's pooled output
        return ((PROMPT_EMBEDS, (length, hidden), "embeds"), (PROMPT_MASK, (length,), "mask"),
                (POOLED_EMBEDS, (_hidden(components["text_encoder_2"]),), "embeds"))
    if recipe == "mllm_byt5":  # encode_prompt: Qwen2.5-VL states and mask; ByT5's, at its own length
        byt5 = inspect.signature(cls._get_byt5_prompt_embeds).parameters["tokenizer_max_length"].default
        return ((PROMPT_EMBEDS, (length, hidden), "embeds"), (PROMPT_MASK, (length,), "mask"),
                (PROMPT_EMBEDS_2, (byt5, _hidden(components["text_encoder_2"])), "embeds"),
                (PROMPT_MASK_2, (byt5,), "mask"))
    if recipe == "gemma":  # the connectors' text projection(s) (LTX2TextConnectors.__init__)
        c = components["connectors"]
        if c.get("per_modality_projections"):
            return ((PROMPT_EMBEDS, (length, c["video_hidden_dim"]), "embeds"), (PROMPT_MASK, (length,), "mask"),
                    (AUDIO_PROMPT_EMBEDS, (length, c["audio_hidden_dim"]), "embeds"))
        return ((PROMPT_EMBEDS, (length, c["caption_channels"]), "embeds"), (PROMPT_MASK, (length,), "mask"))
    return ()


def inspect_text(cfg: Config, vae_class: str) -> TextInfo:
    """What --text-embeddings will load, from the folders' JSON files and the pipeline's code."""
    source = cfg.text_encoder or cfg.model
    hub = model.looks_like_hub_id(source)
    revision = model.hub_revision(source) if hub else None
    index = _read_json(source, MODEL_INDEX, cfg.s3, revision) or {}
    name = index.get("_class_name") or PIPELINES.get(vae_class)
    if name is None:
        raise TextError(f"--text-embeddings: no prompt-embedding recipe for {vae_class}")
    cls = pipeline_class(name)
    recipe = recipe_of(cls)
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
    length = cfg.text_max_length or default_length(cls, recipe)
    if not length:
        raise TextError(f"--text-embeddings: {name} has no default max_sequence_length; give --text-max-length")
    init = inspect.signature(cls.__init__).parameters
    pipeline_config = {k: index.get(k, p.default) for k, p in init.items()
                       if k != "self" and p.default is not inspect.Parameter.empty
                       and isinstance(p.default, (bool, int, float, str))}
    hidden = _hidden(encoder_config)
    subs = RECIPES[recipe][1]
    classes = {sub: _component_class(source, sub, index, cfg.s3, revision) for sub in subs}
    configs = {sub: _read_json(source, f"{sub}/{model.CONFIG_NAME}", cfg.s3, revision) or {} for sub in subs}
    components = tuple((sub, *classes[sub], model.folder_files(source, sub, cfg.s3, HEAD_BYTES)) for sub in subs)
    if hub:
        weights = f"hub commit {revision}" if revision else "unresolved (hub id: its commit could not be resolved)"
    else:  # every weight file the recipe loads (a tokenizer has none)
        weighted = [TEXT_ENCODER, *(sub for sub in subs if not sub.startswith(TOKENIZER))]
        files = [model.folder_files(source, sub, cfg.s3) for sub in weighted]
        weights = hashlib.blake2b(json.dumps(files[0] if len(files) == 1 else files).encode(),
                                  digest_size=8).hexdigest()
    return TextInfo(source=source, pipeline=name, encoder_class=encoder_class, tokenizer_class=tokenizer_class,
                    max_sequence_length=int(length), hidden_size=int(hidden),
                    attention_mask=recipe != "t5" or "prompt_attention_mask" in inspect.signature(
                        cls.encode_prompt).parameters,
                    pipeline_config=pipeline_config,
                    encoder_files=model.folder_files(source, TEXT_ENCODER, cfg.s3, HEAD_BYTES),
                    tokenizer_files=tokenizer_files, encoder_weights=weights, revision=revision, recipe=recipe,
                    components=components, outputs=_outputs(cls, recipe, int(length), int(hidden), configs))


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
