"""The text encoder actor: prompt embeddings for the clips the VAE actors encoded.

Each actor loads the tokenizers and text encoders once (transformers classes, ``from_pretrained``
as the family's diffusers pipeline loads them; LTX-2's connectors with diffusers) and computes the
embeddings by calling that pipeline's own code on them (pipeline.text.RECIPES): the T5 families'
``_get_t5_prompt_embeds``, the HunyuanVideos' ``encode_prompt``, LTX-2's
``_get_gemma_prompt_embeds`` and its connectors' text projection. So the tokenizer calls
(templates, padding, truncation, crops), the masks and any family quirk (Wan's zeroed padding,
Mochi's zeroed empty prompt, HunyuanVideo 1.5's zeros for a prompt without quoted text) are
diffusers', not a copy. Identical captions are encoded once per actor.

Out of memory (on CUDA the GPU is shared with a VAE actor), captions are split in halves down to
one at a time, as the VAE actor splits its batches; a clip whose caption alone does not fit gets
the row the VAE gives a clip that does not fit: retryable, class resource.
"""
from __future__ import annotations

import inspect
import logging
from collections import OrderedDict

import numpy as np

from actors.encoder import cpu_threads
from pipeline import failures, hooks, model, sink
from pipeline.config import Config
from pipeline.schema import (AUDIO_PROMPT_EMBEDS, CAPTION, POOLED_EMBEDS, PROMPT_EMBEDS, PROMPT_EMBEDS_2,
                             PROMPT_MASK, PROMPT_MASK_2, RESOURCE)
from pipeline.text import TEXT_ENCODER, TOKENIZER, TextInfo, pipeline_class, text_dtype

log = logging.getLogger(__name__)

CACHE_CAPTIONS = 4096  # per actor: datasets often share captions (templates, class names)
TEXT_BATCH = 16  # captions per text encoder call


class _PipelineView:
    """What the pipeline's prompt code reads from a pipeline: its tokenizers, text encoders (and
    LTX-2's connectors), execution device, registered config and the attributes its ``__init__``
    sets for that code; the pipeline's methods, bound to this view. Nothing else is built."""

    def __init__(self, cls, components: dict, device, config: dict, attributes: dict | None = None):
        from types import SimpleNamespace

        self._cls, self._execution_device = cls, device
        self.config = SimpleNamespace(**config)
        for name, value in {**components, **(attributes or {})}.items():
            setattr(self, name, value)

    def __getattr__(self, name: str):  # only for what the view lacks: the pipeline's methods
        if name.startswith("__") or name == "_cls":
            raise AttributeError(name)
        attr = inspect.getattr_static(self._cls, name)
        if isinstance(attr, staticmethod):
            return attr.__func__
        if callable(attr):
            return attr.__get__(self, type(self))
        raise AttributeError(name)


def _mllm_attributes(cls, length: int) -> dict:
    """What HunyuanVideo15Pipeline.__init__ sets for its encode_prompt, which calls its
    _get_mllm_prompt_embeds / _get_byt5_prompt_embeds with them: the same values as those
    methods' own defaults (tests/test_text.py checks them against a pipeline instance), except
    the prompt length, which --text-max-length may set."""
    mllm = inspect.signature(cls._get_mllm_prompt_embeds).parameters
    byt5 = inspect.signature(cls._get_byt5_prompt_embeds).parameters
    return {"tokenizer_max_length": length, "system_message": mllm["system_message"].default,
            "prompt_template_encode_start_idx": mllm["crop_start"].default,
            "tokenizer_2_max_length": byt5["tokenizer_max_length"].default}


def load_text(text: TextInfo, device: str, dtype: str, s3=None, allow_pickle: bool = False) -> dict:
    """{subfolder: loaded component}: TEXT_ENCODER/, TOKENIZER/ and the recipe's others beside the
    VAE (fetched once per node from S3), as the pipeline's ``from_pretrained`` loads them."""
    import torch

    pipeline = pipeline_class(text.pipeline)
    wanted = [(TOKENIZER, "transformers", text.tokenizer_class, text.tokenizer_files),
              (TEXT_ENCODER, "transformers", text.encoder_class, text.encoder_files), *text.components]
    loaded = {}
    for sub, library, class_name, files in wanted:
        root = model.fetch_folder(text.source, sub, files, s3)
        cls = _component_class(library, class_name, pipeline)
        kwargs = {"subfolder": sub, "revision": text.revision}  # a hub id: the recorded commit
        if sub.startswith(TOKENIZER):
            loaded[sub] = cls.from_pretrained(root, **kwargs)
            continue
        weights = {"use_safetensors": None if allow_pickle else True}
        loaded[sub] = cls.from_pretrained(root, **kwargs, torch_dtype=getattr(torch, dtype), **weights) \
            .to(device).eval()
    return loaded


def _component_class(library: str, name: str, pipeline):
    """A model_index.json entry's class, as diffusers resolves it: from ``transformers`` or
    ``diffusers``, else from the pipeline's own module (LTX-2's connectors:
    ``["ltx2", "LTX2TextConnectors"]``, not exported by diffusers itself)."""
    import importlib

    if library in ("transformers", "diffusers") and hasattr(importlib.import_module(library), name):
        return getattr(importlib.import_module(library), name)
    return getattr(importlib.import_module(pipeline.__module__.rsplit(".", 1)[0]), name)


class _Projected(Exception):
    """Raised by a hook once the LTX-2 connectors' text projection(s) ran: the rest of their
    forward (the connector transformers) belongs to the transformer side, as in the LTX-2 trainer."""


def _connector_projections(connectors, packed, mask, padding_side: str) -> list:
    """LTX2TextConnectors.forward run by diffusers up to its text projection(s) (its norm over the
    Gemma layers, then ``text_proj_in``, or LTX-2.3's ``video_text_proj_in`` and
    ``audio_text_proj_in``), stopped there: [video] or [video, audio] features, as the LTX-2
    trainer caches them (ltx-trainer scripts/process_captions.py: the feature extractor's output,
    the connector applied during training)."""
    names = ["video_text_proj_in", "audio_text_proj_in"] if connectors.config.per_modality_projections \
        else ["text_proj_in"]
    got = []

    def keep(module, args, output):
        got.append(output)
        if len(got) == len(names):
            raise _Projected

    handles = [getattr(connectors, n).register_forward_hook(keep) for n in names]
    try:
        connectors(packed, mask, padding_side=padding_side)
    except _Projected:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


class TextEncoder:
    """Ray Data actor (map_batches): adds the text columns (TextInfo.columns: PROMPT_EMBEDS [L, D],
    PROMPT_MASK [L] where the pipeline has one, and the family's others) to each row, from its
    CAPTION."""

    @staticmethod
    def ray_options(cfg: Config) -> dict:
        # No CPU reserved (the decode tasks need them; this actor waits on its GPU or uses torch's
        # threads); on CUDA, --text-gpus of each encoder slot's GPU (the VAE actor has the rest).
        return {"num_cpus": 0, "num_gpus": cfg.gpus_per_actor * cfg.text_share if cfg.device == "cuda" else 0,
                "max_restarts": -1, "max_task_retries": 3}

    def __init__(self, cfg: Config, text: TextInfo):
        import torch

        hooks.reach("text-start")
        self.torch, self.cfg, self.text = torch, cfg, text
        self.device = torch.device(hooks.compute_device(cfg.device))
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg))
        components = load_text(text, str(self.device), text_dtype(cfg) or "float32", cfg.s3, cfg.allow_pickle)
        cls = pipeline_class(text.pipeline)
        attributes = _mllm_attributes(cls, text.max_sequence_length) if text.recipe == "mllm_byt5" else None
        self.view = _PipelineView(cls, components, self.device, text.pipeline_config, attributes)
        self.cache: OrderedDict[str, tuple] = OrderedDict()

    def _compute(self, prompts: list[str]) -> dict:
        """{column: tensor [N, ...]} for ``prompts``, by the pipeline's own code."""
        view, length, device = self.view, self.text.max_sequence_length, self.device
        if self.text.recipe == "llama_clip":  # HunyuanVideoPipeline.encode_prompt
            embeds, pooled, mask = view.encode_prompt(prompt=prompts, device=device, max_sequence_length=length)
            return {PROMPT_EMBEDS: embeds, PROMPT_MASK: mask, POOLED_EMBEDS: pooled}
        if self.text.recipe == "mllm_byt5":  # HunyuanVideo15Pipeline.encode_prompt
            embeds, mask, embeds_2, mask_2 = view.encode_prompt(prompt=prompts, device=device,
                                                                batch_size=len(prompts))
            return {PROMPT_EMBEDS: embeds, PROMPT_MASK: mask, PROMPT_EMBEDS_2: embeds_2, PROMPT_MASK_2: mask_2}
        if self.text.recipe == "gemma":  # LTX2Pipeline: Gemma's stacked states, then the connectors' projection
            packed, mask = view._get_gemma_prompt_embeds(prompt=prompts, max_sequence_length=length, device=device)
            # LTX2Pipeline.__call__ passes the connectors the tokenizer's padding side
            side = getattr(view.tokenizer, "padding_side", "left")
            video, *audio = _connector_projections(view.connectors, packed, mask, side)
            return {PROMPT_EMBEDS: video, PROMPT_MASK: mask, **({AUDIO_PROMPT_EMBEDS: audio[0]} if audio else {})}
        result = view._get_t5_prompt_embeds(prompt=prompts, num_videos_per_prompt=1, max_sequence_length=length,
                                            device=device)
        embeds, mask = result if isinstance(result, tuple) else (result, None)
        return {PROMPT_EMBEDS: embeds, **({PROMPT_MASK: mask} if mask is not None else {})}

    def embed(self, captions: list[str]) -> list[dict | None]:
        """[{column: array}] per caption (embeddings in the storage dtype, masks uint8), through the
        pipeline's own code; None for a caption that alone does not fit in the device's memory.
        Batched, except an empty caption, which Mochi's pipeline treats specially by looking at
        the batch's last prompt: alone, it gets exactly its own result."""
        out: dict[int, tuple | None] = {}
        plain = [i for i, c in enumerate(captions) if c != ""]
        groups = [plain[s:s + TEXT_BATCH] for s in range(0, len(plain), TEXT_BATCH)]
        groups += [[i] for i, c in enumerate(captions) if c == ""]
        with self.torch.inference_mode():
            for idx in groups:
                out.update(self._embed_fitting(captions, idx))
        return [out[i] for i in range(len(captions))]

    def _embed_fitting(self, captions: list[str], idx: list[int]) -> dict[int, dict | None]:
        """Embed captions ``idx``; out of memory (the GPU is shared with the VAE actor), split
        them in halves down to single captions, as the VAE actor splits its batches. A caption
        that alone does not fit maps to None. Any other failure goes on up."""
        try:
            result = self._compute([captions[i] for i in idx])
        except Exception as e:  # noqa: BLE001 - out of memory is met below; the rest goes on up
            if not failures.is_out_of_memory(e):
                raise
            log.warning("text encoder out of memory on %d caption(s) (%s)", len(idx), failures.first_line(e))
            result = None
        if result is None:  # outside the except block, so that its frames' tensors can be freed
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()
            if len(idx) == 1:
                return {idx[0]: None}
            half = len(idx) // 2
            return {**self._embed_fitting(captions, idx[:half]), **self._embed_fitting(captions, idx[half:])}
        kinds = {name: kind for name, _, kind in self.text.columns}
        arrays = {name: t.to(self.torch.uint8 if kinds[name] == "mask" else getattr(self.torch, self.cfg.latent_dtype))
                  .cpu().numpy() for name, t in result.items()}
        return {i: {name: a[j] for name, a in arrays.items()} for j, i in enumerate(idx)}

    def __call__(self, batch: dict) -> dict:
        hooks.reach("text")
        captions = [str(c) for c in np.asarray(batch[CAPTION]).tolist()]
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
        fresh = dict(zip(missing, self.embed(missing))) if missing else {}
        values = [fresh[c] if c in fresh else self.cache[c] for c in captions]
        for c, value in zip(captions, values):
            if value is not None:  # a caption that did not fit is tried afresh next time
                self.cache[c] = value
                self.cache.move_to_end(c)
        while len(self.cache) > CACHE_CAPTIONS:
            self.cache.popitem(last=False)
        if any(v is None for v in values):
            batch, values = self._drop_unfitting(batch, values)
        batch = dict(batch)
        for name, shape, kind in self.text.columns:
            batch[name] = np.stack([v[name] for v in values]) if values else \
                np.zeros((0, *shape), dtype=np.uint8 if kind == "mask" else self.cfg.latent_dtype)
        return batch

    def _drop_unfitting(self, batch: dict, values: list) -> tuple[dict, list]:
        """The clips whose caption alone does not fit get what the VAE actor gives a clip that
        does not fit: a retryable error row of class resource (another GPU, or a less crowded
        one, may fit it; the run exits 1 and a rerun tries them again). The rest go on."""
        uris, clip_ids = np.asarray(batch["source_uri"]).tolist(), np.asarray(batch["clip_id"]).tolist()
        for i, value in enumerate(values):
            if value is None:
                sink.write_error(self.cfg, sink.error_row(
                    uris[i], "encode", "OutOfMemory",
                    "the clip's caption alone does not fit in the text encoder's device memory",
                    clip_ids[i], error_class=RESOURCE, retryable=True))
        kept = [i for i, value in enumerate(values) if value is not None]
        return {k: np.asarray(v)[kept] for k, v in batch.items()}, [values[i] for i in kept]
