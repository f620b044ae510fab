"""The text encoder actor: prompt embeddings for the clips the VAE actors encoded.

Each actor loads the tokenizer and text encoder once (transformers classes, ``from_pretrained``
as the family's diffusers pipeline loads them) and computes the embeddings by calling that
pipeline's own ``_get_t5_prompt_embeds`` on them, so the tokenizer call (padding to the maximum
length, truncation, special tokens), the mask and any family quirk (Wan's zeroed padding, Mochi's
zeroed empty prompt) are diffusers', not a copy. Identical captions are encoded once per actor.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from actors.encoder import cpu_threads
from pipeline import hooks, model
from pipeline.config import Config
from pipeline.schema import CAPTION, PROMPT_EMBEDS, PROMPT_MASK
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

    def embed(self, captions: list[str]) -> list[tuple]:
        """[(embeds [L, D] in the storage dtype, mask [L] uint8 or None)] per caption, through the
        pipeline's own code. Batched, except an empty caption, which Mochi's pipeline treats
        specially by looking at the batch's last prompt: alone, it gets exactly its own result."""
        out: dict[int, tuple] = {}
        plain = [i for i, c in enumerate(captions) if c != ""]
        groups = [plain[s:s + TEXT_BATCH] for s in range(0, len(plain), TEXT_BATCH)]
        groups += [[i] for i, c in enumerate(captions) if c == ""]
        storage = getattr(self.torch, self.cfg.latent_dtype)
        with self.torch.inference_mode():
            for idx in groups:
                result = self.embed_fn(self.view, prompt=[captions[i] for i in idx], num_videos_per_prompt=1,
                                       max_sequence_length=self.text.max_sequence_length, device=self.device)
                embeds, mask = result if isinstance(result, tuple) else (result, None)
                embeds = embeds.to(storage).cpu().numpy()
                mask = None if mask is None else mask.to(self.torch.uint8).cpu().numpy()
                for j, i in enumerate(idx):
                    out[i] = (embeds[j], None if mask is None else mask[j])
        return [out[i] for i in range(len(captions))]

    def __call__(self, batch: dict) -> dict:
        hooks.reach("text")
        captions = [str(c) for c in np.asarray(batch[CAPTION]).tolist()]
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
        fresh = dict(zip(missing, self.embed(missing))) if missing else {}
        values = [fresh[c] if c in fresh else self.cache[c] for c in captions]
        for c, value in zip(captions, values):
            self.cache[c] = value
            self.cache.move_to_end(c)
        while len(self.cache) > CACHE_CAPTIONS:
            self.cache.popitem(last=False)
        shape = (self.text.max_sequence_length, self.text.hidden_size)
        batch = dict(batch)
        batch[PROMPT_EMBEDS] = np.stack([v[0] for v in values]) if values else \
            np.zeros((0, *shape), dtype=self.cfg.latent_dtype)
        if self.text.attention_mask:
            batch[PROMPT_MASK] = np.stack([v[1] for v in values]) if values else \
                np.zeros((0, shape[0]), dtype=np.uint8)
        return batch
