"""The text encoder actor: prompt embeddings for the clips the VAE actors encoded.

Each actor loads the tokenizer and text encoder once (transformers classes, ``from_pretrained``
as the family's diffusers pipeline loads them) and computes the embeddings by calling that
pipeline's own ``_get_t5_prompt_embeds`` on them, so the tokenizer call (padding to the maximum
length, truncation, special tokens), the mask and any family quirk (Wan's zeroed padding, Mochi's
zeroed empty prompt) are diffusers', not a copy. Identical captions are encoded once per actor.

Out of memory (on CUDA the GPU is shared with a VAE actor), captions are split in halves down to
one at a time, as the VAE actor splits its batches; a clip whose caption alone does not fit gets
the row the VAE gives a clip that does not fit: retryable, class resource.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from actors.encoder import cpu_threads
from pipeline import failures, hooks, model, sink
from pipeline.config import Config
from pipeline.schema import CAPTION, PROMPT_EMBEDS, PROMPT_MASK, RESOURCE
from pipeline.text import TEXT_ENCODER, TOKENIZER, TextInfo, pipeline_class, text_dtype

log = logging.getLogger(__name__)

CACHE_CAPTIONS = 4096  # per actor: datasets often share captions (templates, class names)
TEXT_BATCH = 16  # captions per text encoder call


class _PipelineView:
    """What ``_get_t5_prompt_embeds`` reads from a pipeline: its tokenizer, text encoder,
    execution device and registered config; nothing else of the pipeline is built."""

    def __init__(self, tokenizer, text_encoder, device, config: dict):
        from types import SimpleNamespace

        self.tokenizer, self.text_encoder, self._execution_device = tokenizer, text_encoder, device
        self.config = SimpleNamespace(**config)


def load_text(text: TextInfo, device: str, dtype: str, s3=None, allow_pickle: bool = False):
    """(tokenizer, text encoder) from TEXT_ENCODER/ and TOKENIZER/ beside the VAE (fetched once per
    node from S3), as the pipeline's ``from_pretrained`` loads them."""
    import torch
    import transformers

    encoder_root = model.fetch_folder(text.source, TEXT_ENCODER, text.encoder_files, s3)
    tokenizer_root = model.fetch_folder(text.source, TOKENIZER, text.tokenizer_files, s3)
    tokenizer = getattr(transformers, text.tokenizer_class).from_pretrained(
        tokenizer_root, subfolder=TOKENIZER, revision=text.revision)  # a hub id: the recorded commit
    encoder = getattr(transformers, text.encoder_class).from_pretrained(
        encoder_root, subfolder=TEXT_ENCODER, revision=text.revision, torch_dtype=getattr(torch, dtype), use_safetensors=None if allow_pickle else True)
    return tokenizer, encoder.to(device).eval()


class TextEncoder:
    """Ray Data actor (map_batches): adds PROMPT_EMBEDS [L, D] (and PROMPT_MASK [L] where the
    pipeline has one) to each row, from its CAPTION."""

    @staticmethod
    def ray_options(cfg: Config) -> dict:
        # No CPU reserved (the decode tasks need them; this actor waits on its GPU or uses torch's
        # threads); on CUDA, --text-gpus of each encoder slot's GPU (the VAE actor has the rest).
        return {"num_cpus": 0, "num_gpus": cfg.gpus_per_actor * cfg.text_gpus if cfg.device == "cuda" else 0,
                "max_restarts": -1, "max_task_retries": 3}

    def __init__(self, cfg: Config, text: TextInfo):
        import torch

        hooks.reach("text-start")
        self.torch, self.cfg, self.text = torch, cfg, text
        self.device = torch.device(hooks.compute_device(cfg.device))
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg))
        tokenizer, encoder = load_text(text, str(self.device), text_dtype(cfg) or "float32", cfg.s3,
                                       cfg.allow_pickle)
        self.view = _PipelineView(tokenizer, encoder, self.device, text.pipeline_config)
        self.embed_fn = pipeline_class(text.pipeline)._get_t5_prompt_embeds
        self.cache: OrderedDict[str, tuple] = OrderedDict()

    def embed(self, captions: list[str]) -> list[tuple | None]:
        """[(embeds [L, D] in the storage dtype, mask [L] uint8 or None)] per caption, through the
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

    def _embed_fitting(self, captions: list[str], idx: list[int]) -> dict[int, tuple | None]:
        """Embed captions ``idx``; out of memory (the GPU is shared with the VAE actor), split
        them in halves down to single captions, as the VAE actor splits its batches. A caption
        that alone does not fit maps to None. Any other failure goes on up."""
        try:
            result = self.embed_fn(self.view, prompt=[captions[i] for i in idx], num_videos_per_prompt=1,
                                   max_sequence_length=self.text.max_sequence_length, device=self.device)
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
        embeds, mask = result if isinstance(result, tuple) else (result, None)
        embeds = embeds.to(getattr(self.torch, self.cfg.latent_dtype)).cpu().numpy()
        mask = None if mask is None else mask.to(self.torch.uint8).cpu().numpy()
        return {i: (embeds[j], None if mask is None else mask[j]) for j, i in enumerate(idx)}

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
        shape = (self.text.max_sequence_length, self.text.hidden_size)
        batch = dict(batch)
        batch[PROMPT_EMBEDS] = np.stack([v[0] for v in values]) if values else \
            np.zeros((0, *shape), dtype=self.cfg.latent_dtype)
        if self.text.attention_mask:
            batch[PROMPT_MASK] = np.stack([v[1] for v in values]) if values else \
                np.zeros((0, shape[0]), dtype=np.uint8)
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
