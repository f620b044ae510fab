"""``--format finetrainers``: DEST is a finetrainers ``--precomputation_dir``:
``finetrainers-precomputed-data/`` with ``latent-{i}.pt`` and ``condition-{i}.pt`` per clip
(CogVideoX, Wan), read back with ``--enable_precomputation --precomputation_reuse``."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline import storage
from pipeline.commands.export.common import ExportError, Source, as_tensor, text_length, torch_module
from pipeline.schema import PROMPT_EMBEDS

# a-r-r-o-w/finetrainers @ f476c37, under finetrainers/:
#   data/precomputation.py            PRECOMPUTED_DATA_DIR, _save_item / _load_item
#                                     ({data_type}-{index}.pt, torch.save, torch.load(weights_only=True)),
#                                     PrecomputedOnceDataIterable (--precomputation_reuse: counts
#                                     {data_type}-*.pt, index = rank * (count // world_size) + i)
#   models/cogvideox/base_specification.py, models/wan/base_specification.py
#                                     the latent processors with compute_posterior=False (what
#                                     --enable_precomputation uses), prepare_conditions, forward
#   processors/t5.py                  T5Processor: padded to max_sequence_length, pad positions kept
FINETRAINERS_DIR = "finetrainers-precomputed-data"
# finetrainers requires --dataset_config and loads that dataset even with --precomputation_reuse
# (args.py:759 required=True, :1012-1015 the file must exist; trainer/sft_trainer/trainer.py:236-274
# _prepare_dataset at start-up). With reuse nothing is read from it: PrecomputedDistributedData
# Preprocessor.consume skips the data iterator (data/precomputation.py:193-214). The smallest dataset
# its loader accepts is a folder with prompts.txt and videos.txt of as many lines
# (data/dataset.py:859-903 _initialize_local_dataset -> VideoFileCaptionFileListDataset, :272-322;
# the videos are opened only when iterated).
DATASET_CONFIG = "finetrainers-dataset.json"
DATASET_DIR = "finetrainers-dataset"


def _moments(row: dict) -> np.ndarray:
    """The posterior's moments, [T, 2C, h, w]: mean then logvar along the channels, as the VAE's
    ``_encode`` returns them (diffusers' DiagonalGaussianDistribution chunks them in that order)."""
    return np.concatenate([row["latents_mean"], row["latents_logvar"]], axis=1)


def _cogvideox_latents(row: dict):
    # CogVideoXLatentEncodeProcessor: vae._encode's moments permuted to [B, F, 2C, H, W];
    # forward() samples a DiagonalGaussianDistribution along dim 2, then scales.
    return as_tensor(_moments(row)[None])


def _wan_latents(row: dict):
    # WanLatentEncodeProcessor: vae._encode's raw moments [B, 2C, F, H, W]; forward() normalises
    # them with the statistics beside them, then samples.
    return as_tensor(_moments(row).transpose(1, 0, 2, 3)[None])


def _no_constants(meta: dict) -> dict:
    return {}


def _wan_statistics(meta: dict) -> dict:
    # WanLatentEncodeProcessor: latents_mean = tensor(config.latents_mean), latents_std =
    # 1 / tensor(config.latents_std), float32 [C], in every latent file.
    torch = torch_module()
    mean, std = meta.get("latents_mean"), meta.get("latents_std")
    if not isinstance(mean, list) or not isinstance(std, list):
        raise ExportError("finetrainers' Wan latent files carry latents_mean/latents_std; OUTPUT's "
                          "metadata has no per-channel statistics")
    return {"latents_mean": torch.tensor(mean), "latents_std": 1.0 / torch.tensor(std)}


@dataclass(frozen=True)
class FinetrainersModel:
    name: str  # --model_name
    latents: Callable[[dict], object]  # row -> the "latents" tensor of latent-{i}.pt
    constants: Callable[[dict], dict]  # metadata -> what every latent-{i}.pt carries beside it
    text_length: int  # prepare_conditions' max_sequence_length default
    image_note: str  # why OUTPUT's image latents cannot be its image conditioning
    text_note: str | None = None  # how its own conditions differ from the diffusers pipeline's
    fixed_text_length: str | None = None  # why another text length fails its model (exit 1)
    t2v_note: str | None = None  # what an image-to-video checkpoint would need beyond these files


FINETRAINERS = {
    "AutoencoderKLCogVideoX": FinetrainersModel(
        "cogvideox", _cogvideox_latents, _no_constants, 226,  # cogvideox/base_specification.py:219
        "finetrainers' CogVideoX specification trains text-to-video and takes none",
        None,
        # diffusers CogVideoXTransformer3DModel: use_positional_embeddings = not use_rotary_positional_
        # embeddings (cogvideox_transformer_3d.py:277); CogVideoXPatchEmbed builds its joint position
        # embedding for max_text_seq_length (226) text tokens (embeddings.py:513-516)
        "CogVideoX-2b's transformer adds a position embedding sized for 226 text tokens and fails on any other "
        "length (CogVideoX-5b, with rotary embeddings, takes it): re-encode with --text-max-length 226"),
    "AutoencoderKLWan": FinetrainersModel(
        "wan", _wan_latents, _wan_statistics, 512,
        # WanImageConditioningLatentEncodeProcessor and WanImageEncodeProcessor
        "finetrainers' Wan I2V conditioning is the posterior of the first frame followed by black frames, "
        "a frame mask and CLIP image embeddings, not the first frame alone",
        # wan/base_specification.py:243 T5Processor(["encoder_hidden_states", "__drop__"]) with its
        # default use_attention_mask=False (processors/t5.py:25, :77-80): UMT5 runs without the mask
        "condition files hold WanPipeline's UMT5 embeddings, computed with the attention mask and zero after the "
        "prompt's tokens; finetrainers' own Wan precomputation runs UMT5 without the mask, which changes the real "
        "tokens' states too (they attend to the padding), not only the padding's",
        None,
        # wan/base_specification.py:172-207: the I2V condition adds CLIP image embeddings
        "only text-to-video checkpoints can train on these files: a Wan I2V checkpoint needs CLIP image "
        "features and the image-conditioning latents, which the export does not write"),
}


class FinetrainersWriter:
    trainer = "finetrainers"
    scan_columns = ["height", "width"]
    sidecars = [DATASET_CONFIG, f"{DATASET_DIR}/prompts.txt", f"{DATASET_DIR}/videos.txt"]

    def __init__(self, source: Source, dest: str, s3):
        meta = source.meta
        self.model = FINETRAINERS[meta["vae_class"]]
        if meta["latent_mode"] != "dist":
            raise ExportError(
                f"finetrainers' precomputed latents are the VAE posterior's mean and logvar, sampled afresh at "
                f"every step; OUTPUT holds --latent-mode {meta['latent_mode']} latents, from which they cannot be "
                f"recovered: encode with --latent-mode dist for finetrainers")
        self.s3, self.dest = s3, dest
        self.constants = self.model.constants(meta)  # the same tensors in every latent file
        self.folder = storage.join(dest, FINETRAINERS_DIR)
        self.has_text = PROMPT_EMBEDS in source.columns
        self.columns = ["latents_mean", "latents_logvar", *([PROMPT_EMBEDS] if self.has_text else [])]
        self.notes = self._notes(source)

    def _notes(self, source: Source) -> list[str]:
        """What the trainer will lack, or take differently from its own precomputation, one line each."""
        notes = []
        if not self.has_text:
            notes.append(f"no {PROMPT_EMBEDS} in OUTPUT: wrote no condition-{{i}}.pt files, and finetrainers "
                         f"needs one beside each latent-{{i}}.pt (--precomputation_reuse fails on an empty "
                         f"condition set); encode with --text-embeddings")
        length = text_length(source.meta)
        self.text_length_fails = bool(self.has_text and length and length != self.model.text_length
                                      and self.model.fixed_text_length)
        if self.has_text and length and length != self.model.text_length:
            notes.append(f"prompts padded to {length} tokens; finetrainers' own {self.model.name} conditions "
                         f"have {self.model.text_length}" + (f": {self.model.fixed_text_length}"
                                                             if self.text_length_fails else ""))
        if self.has_text and self.model.text_note:
            notes.append(self.model.text_note)
        if self.model.t2v_note:
            notes.append(self.model.t2v_note)
        if source.has_image_latents:
            notes.append(f"image latents not exported: {self.model.image_note}")
        notes.append("run finetrainers with --precomputation_reuse: without it, finetrainers deletes "
                     f"DEST/{FINETRAINERS_DIR} and precomputes from its dataset, which here is a placeholder")
        return notes

    @property
    def usable(self) -> bool:
        return self.has_text and not self.text_length_fails

    def names(self, index: int, row: dict) -> list[str]:
        return [f"{FINETRAINERS_DIR}/latent-{index}.pt",
                *([f"{FINETRAINERS_DIR}/condition-{index}.pt"] if self.has_text else [])]

    def _path(self, name: str) -> str:
        """As finetrainers finds it: absolute for a local DEST; for S3, relative to a local copy run
        from ("./": a bare name would be taken for a Hub dataset id, data/dataset.py:834-840)."""
        if storage.is_s3(self.dest):
            return f"./{name}" if name != "." else "."
        return os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(self.dest)), name))

    def final_files(self, items: int) -> dict[str, bytes]:
        """The dataset config and the one-item dataset it names, written last: finetrainers refuses
        to start without the config, so an interrupted export is never trained on."""
        config = {"datasets": [{"data_root": self._path(DATASET_DIR), "dataset_type": "video"}]}
        return {f"{DATASET_DIR}/prompts.txt": b"precomputed by video-latents export: unused with "
                                              b"--precomputation_reuse\n",
                f"{DATASET_DIR}/videos.txt": b"unused.mp4\n",
                DATASET_CONFIG: (json.dumps(config, indent=2) + "\n").encode()}

    def write(self, index: int, row: dict) -> None:
        self._save(f"latent-{index}.pt", {"latents": self.model.latents(row), **self.constants})
        if self.has_text:
            # The condition is the padded states alone: CogVideoX's prepare_conditions pops the
            # mask, Wan's T5Processor drops it.
            self._save(f"condition-{index}.pt", {"encoder_hidden_states": as_tensor(row[PROMPT_EMBEDS][None])})

    def _save(self, name: str, item: dict) -> None:
        buffer = io.BytesIO()
        torch_module().save(item, buffer)
        storage.write_bytes_atomic(storage.join(self.folder, name), buffer.getvalue(), self.s3)

    def close(self) -> None:
        pass

    def summary(self) -> dict:
        cd = "" if not storage.is_s3(self.dest) else "copy DEST to a local folder and run from it: "
        return {"model_name": self.model.name, "condition_files": self.has_text,
                "dataset_config": self._path(DATASET_CONFIG),
                "use": f"{cd}torchrun --standalone --nproc_per_node=1 train.py --parallel_backend ptd "
                       f"--model_name {self.model.name} --pretrained_model_name_or_path MODEL --training_type lora "
                       f"--dataset_config {self._path(DATASET_CONFIG)} --enable_precomputation "
                       f"--precomputation_reuse --precomputation_dir {self._path('.')} --output_dir OUT ..."}
