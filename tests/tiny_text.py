"""Tiny random-weight text encoders of LTX-2 and the HunyuanVideos, saved in a diffusers
repository's layout with the model_index.json the real repositories have.

Models are built from transformers' (and diffusers') own config classes; tokenizers are the real
classes, built from a BPE vocabulary trained here on samples.CAPTIONS (as
samples.make_tiny_text_encoder trains T5's), so nothing is downloaded.
"""
from __future__ import annotations

import json
import os

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from pipeline import samples

TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1)
# A caption with quoted text: HunyuanVideo 1.5's ByT5 encodes it; the others get zeros.
GLYPH_CAPTION = 'a shop sign that reads "OPEN LATE" above the door'


def _bpe(specials: list[str], suffix: str | None = None, metaspace: bool = False) -> tuple[dict, list]:
    """(vocab, merges) of a small BPE trained on the sample captions, with ``specials`` first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace() if metaspace else pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=[] if metaspace else pre_tokenizers.ByteLevel.alphabet(),
                                  **({"end_of_word_suffix": suffix} if suffix else {}))
    tok.train_from_iterator([*samples.CAPTIONS, GLYPH_CAPTION] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _save(folder: str, index: dict, parts: dict) -> str:
    for sub, obj in parts.items():
        obj.save_pretrained(os.path.join(folder, sub))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return folder


def make_hunyuan_video(folder: str, seed: int = 0) -> str:
    """HunyuanVideoPipeline's text side: a Llama (LlamaModel) with its fast tokenizer, and CLIP-L's
    text model (CLIPTextModel) with CLIPTokenizer."""
    torch.manual_seed(seed)
    vocab, merges = _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<|start_header_id|>",
                          "<|end_header_id|>", "<|eot_id|>"])
    llama_tok = transformers.LlamaTokenizerFast(vocab=vocab, merges=merges, bos_token="<|begin_of_text|>",
                                                eos_token="<|end_of_text|>", unk_token=None, pad_token="<pad>")
    llama = transformers.LlamaModel(transformers.LlamaConfig(vocab_size=len(vocab), max_position_embeddings=512,
                                                             pad_token_id=vocab["<pad>"], **TINY))
    vocab, merges = _bpe(["<|startoftext|>", "<|endoftext|>"], suffix="</w>")
    clip_tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    index = {"_class_name": "HunyuanVideoPipeline", "text_encoder": ["transformers", "LlamaModel"],
             "tokenizer": ["transformers", "LlamaTokenizerFast"], "text_encoder_2": ["transformers", "CLIPTextModel"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "vae": ["diffusers", "AutoencoderKLHunyuanVideo"]}
    return _save(folder, index, {"tokenizer": llama_tok, "text_encoder": llama.eval(), "tokenizer_2": clip_tok,
                                 "text_encoder_2": clip.eval()})


# Qwen2's chat template, reduced to what HunyuanVideo15Pipeline's messages use (system, user,
# then the generation prompt).
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_hunyuan_video_15(folder: str, seed: int = 0) -> str:
    """HunyuanVideo15Pipeline's text side: Qwen2.5-VL's text model (Qwen2_5_VLTextModel) with
    Qwen2Tokenizer and a chat template, and a ByT5 encoder (T5EncoderModel) with ByT5Tokenizer."""
    torch.manual_seed(seed)
    vocab, merges = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    qwen_tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, pad_token="<|endoftext|>",
                                           eos_token="<|im_end|>")
    qwen_tok.chat_template = QWEN_CHAT_TEMPLATE
    qwen = transformers.Qwen2_5_VLTextModel(transformers.Qwen2_5_VLTextConfig(
        vocab_size=len(vocab), max_position_embeddings=2048, pad_token_id=0, bos_token_id=None,
        eos_token_id=vocab["<|im_end|>"], **TINY,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}))  # head_dim 8
    byt5_tok = transformers.ByT5Tokenizer()
    byt5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(byt5_tok), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1))
    index = {"_class_name": "HunyuanVideo15Pipeline", "text_encoder": ["transformers", "Qwen2_5_VLTextModel"],
             "tokenizer": ["transformers", "Qwen2Tokenizer"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer_2": ["transformers", "ByT5Tokenizer"], "vae": ["diffusers", "AutoencoderKLHunyuanVideo15"]}
    return _save(folder, index, {"tokenizer": qwen_tok, "text_encoder": qwen.eval(), "tokenizer_2": byt5_tok,
                                 "text_encoder_2": byt5.eval()})


def make_ltx2(folder: str, per_modality: bool = False, seed: int = 0) -> str:
    """LTX2Pipeline's text side: Gemma 3 (Gemma3ForConditionalGeneration, with a tiny SigLIP
    tower, as the real one has), GemmaTokenizerFast, and LTX2TextConnectors (LTX-2.0's one text
    projection, or LTX-2.3's per-modality ones)."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    torch.manual_seed(seed)
    vocab, merges = _bpe(["<pad>", "<eos>", "<bos>", "<unk>"], metaspace=True)
    tok = transformers.GemmaTokenizerFast(vocab=vocab, merges=merges)
    text = transformers.Gemma3TextConfig(vocab_size=len(vocab), head_dim=8, max_position_embeddings=2048,
                                         sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=2, **TINY)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    gemma = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4))
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=TINY["num_hidden_layers"] + 1,
        video_connector_num_attention_heads=2, video_connector_attention_head_dim=8 if not per_modality else 12,
        video_connector_num_layers=1, video_connector_num_learnable_registers=8,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8 if not per_modality else 4,
        audio_connector_num_layers=1, audio_connector_num_learnable_registers=8,
        per_modality_projections=per_modality, video_hidden_dim=24, audio_hidden_dim=8)
    index = {"_class_name": "LTX2Pipeline", "text_encoder": ["transformers", "Gemma3ForConditionalGeneration"],
             "tokenizer": ["transformers", "GemmaTokenizerFast"], "connectors": ["ltx2", "LTX2TextConnectors"],
             "vae": ["diffusers", "AutoencoderKLLTX2Video"]}
    return _save(folder, index, {"tokenizer": tok, "text_encoder": gemma.eval(), "connectors": connectors.eval()})
