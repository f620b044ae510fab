"""``video-latents export OUTPUT DEST --format musubi|finetrainers``: OUTPUT's clips written as a
trainer's own latent cache, so that a team can keep its trainer. One module per format:

  musubi.py        DEST is a musubi-tuner ``cache_directory``
  finetrainers.py  DEST is a finetrainers ``--precomputation_dir``
  common.py        reading OUTPUT and undoing its normalisation, which both share

Verified against the trainers' source (cited where each fact is used):
  kohya-ss/musubi-tuner @ 30c658c4f4b0bf05038b3346eff9670259b10fc7
  a-r-r-o-w/finetrainers @ f476c3717da6cbfb1070505a99ee989426b46d9c (now huggingface/finetrainers).

OUTPUT is read file by file, a few rows at a time: memory follows one Parquet row group, never the
size of OUTPUT. Both OUTPUT and DEST may be local folders or ``s3://`` prefixes.

Exit codes: 0 DEST holds what the trainer loads for every clip (for musubi, possibly all but the
text-encoder files, with the captions musubi's own text-caching script needs to add them);
1 the latents were written but the trainer cannot train on DEST as it is (stderr says what is
missing); 2 refused before anything was written: the format cannot express this OUTPUT (stderr says
why and what to change), or DEST holds something other than this export.
"""
from __future__ import annotations

import argparse
import json

import pyarrow.fs as pafs

from pipeline import layout, storage
from pipeline.commands.export.common import ExportError, batch_rows, iter_rows, log, open_output, raw_latents
from pipeline.commands.export.finetrainers import FINETRAINERS, FINETRAINERS_DIR, FinetrainersWriter
from pipeline.commands.export.musubi import MUSUBI, MUSUBI_JSONL, MusubiWriter

__all__ = ["ExportError", "batch_rows", "raw_latents", "export", "export_command", "add_parser",
           "MARKER", "MUSUBI_JSONL", "FINETRAINERS_DIR"]

FORMATS = ("musubi", "finetrainers")
EXIT_OK, EXIT_UNUSABLE, EXIT_USAGE = 0, 1, 2
MARKER = "_export.json"  # DEST's record of which OUTPUT and format it holds; trainers' globs skip it
WRITERS = {"musubi": MusubiWriter, "finetrainers": FinetrainersWriter}
FAMILIES = {"musubi": MUSUBI, "finetrainers": FINETRAINERS}  # the VAE classes each format takes


def _check_family(meta: dict, fmt: str) -> None:
    vae_class = meta.get("vae_class")
    if vae_class not in FAMILIES[fmt]:
        other = next(f for f in FORMATS if f != fmt)
        hint = f"; use --format {other}" if vae_class in FAMILIES[other] else ""
        raise ExportError(f"--format {fmt} takes {', '.join(sorted(FAMILIES[fmt]))} latents, not {vae_class}{hint}")


def _claim(dest: str, output: str, fmt: str, s3) -> None:
    """DEST must be empty, or hold this same export (a rerun rewrites the same files): a trainer
    globs its cache folder, so anything else there would be trained on too."""
    fs, path = storage.resolve(dest, s3)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    marker = layout.read_json(dest, MARKER, s3) if entries else None
    if entries and not (marker and (marker.get("output"), marker.get("format")) == (output, fmt)):
        raise ExportError(f"DEST {dest} is not empty: give a new or empty folder (rerunning the same export "
                          f"into it is fine)")


def export(output: str, dest: str, fmt: str, s3=None) -> tuple[dict, bool]:
    """Write OUTPUT's clips into DEST in ``fmt``; returns (summary, whether the trainer can use DEST).
    Raises ExportError, before writing anything, when the format cannot express OUTPUT."""
    source = open_output(output, s3)
    _check_family(source.meta, fmt)
    writer = WRITERS[fmt](source, dest, s3)
    _claim(dest, output, fmt, s3)
    for line in writer.notes:
        log(line)
    if not layout.read_json(output, layout.SUCCESS, s3):
        log("OUTPUT has no _SUCCESS (its run is not complete): exporting the clips written so far")
    layout.write_json(dest, MARKER, {"output": output, "format": fmt, "complete": False}, s3)
    items = 0
    try:
        for items, row in enumerate(iter_rows(source, writer.columns), start=1):
            writer.write(items - 1, row)
    finally:
        writer.close()
    summary = {"format": fmt, "output": output, "dest": dest, "items": items, "vae_class": source.meta["vae_class"],
               "latent_mode": source.meta["latent_mode"], **writer.summary(), "notes": writer.notes,
               "usable": writer.usable}
    layout.write_json(dest, MARKER, {**summary, "complete": True}, s3)
    return summary, writer.usable


def export_command(output: str, dest: str, fmt: str, s3_endpoint: str | None) -> int:
    s3 = storage.default_endpoint(s3_endpoint)
    try:
        summary, usable = export(output, dest, fmt, s3)
    except ExportError as e:
        log(f"error: {e}")
        return EXIT_USAGE
    print(json.dumps(summary))
    if not usable:
        log(f"wrote {summary['items']} clips' latents, but the trainer cannot train on DEST as it is (see above)")
        return EXIT_UNUSABLE
    return EXIT_OK


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``export`` subcommand, on the CLI's subparsers."""
    p = sub.add_parser("export", help="write OUTPUT's latents as a trainer's cache (musubi-tuner, finetrainers)")
    p.add_argument("output", metavar="OUTPUT", help="an encode's OUTPUT (s3://bucket/prefix/ or a local folder)")
    p.add_argument("dest", metavar="DEST",
                   help="a new or empty folder or s3:// prefix: musubi's cache_directory, or finetrainers' "
                        "--precomputation_dir")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="musubi: HunyuanVideo and Wan (mode, sample or dist OUTPUTs); finetrainers: CogVideoX "
                        "and Wan (dist OUTPUTs: --latent-mode dist); both want --text-embeddings (Wan, CogVideoX)")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    return p
