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

Exit codes: 0 DEST holds what the trainer loads and trains on for every clip; 1 the latents were
written but the trainer cannot train on DEST as it is (stderr says what is missing and the command
that adds it); 2 refused before anything was written: the format cannot express this OUTPUT, OUTPUT
is incomplete (no _SUCCESS; --allow-incomplete), or DEST holds files this export did not write.

DEST belongs to the export: ``_export-files.txt`` lists every file it wrote, and a rerun deletes
those that the new export does not write again. The files that make DEST usable (the trainer's
dataset config) are deleted first and written last, so an interrupted export is refused by the
trainer instead of trained on.
"""
from __future__ import annotations

import argparse
import json

import pyarrow.fs as pafs

from pipeline import hooks, layout, storage
from pipeline.commands.export.common import (PATCHIFIED, ExportError, batch_rows, iter_rows, log, open_output,
                                             raw_latents, unpatchifiable)
from pipeline.commands.export.finetrainers import FINETRAINERS, FINETRAINERS_DIR, FinetrainersWriter
from pipeline.commands.export.musubi import MUSUBI, MUSUBI_JSONL, MUSUBI_TOML, MusubiWriter

__all__ = ["ExportError", "batch_rows", "raw_latents", "export", "export_command", "add_parser",
           "MARKER", "MUSUBI_JSONL", "MUSUBI_TOML", "FINETRAINERS_DIR"]

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


FILES = "_export-files.txt"  # every file the export wrote into DEST, one relative name a line


def _bookkeeping(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return name in (MARKER, FILES) or (base.startswith(".") and ".tmp-" in base)  # a crashed atomic write


def _claim(dest: str, output: str, fmt: str, s3) -> set[str]:
    """The files a previous run of this export wrote into DEST (it may replace them). DEST must be
    empty or hold only those: a trainer globs its cache folder, so anything else there would be
    trained on too, and the export deletes only what it wrote."""
    fs, path = storage.resolve(dest, s3)
    root = path.rstrip("/") + "/"
    present = sorted(i.path[len(root):] for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True,
                                                                                      recursive=True))
                     if i.type == pafs.FileType.File)
    present = [n for n in present if not _bookkeeping(n)]
    marker = layout.read_json(dest, MARKER, s3)
    if marker is None and not present:
        return set()
    if not (marker and (marker.get("output"), marker.get("format")) == (output, fmt)):
        raise ExportError(f"DEST {dest} is not empty: give a new or empty folder (rerunning the same export "
                          f"into it is fine)")
    try:
        ours = set(storage.read_bytes(storage.join(dest, FILES), s3).decode().splitlines())
    except FileNotFoundError:
        ours = set()
    foreign = [n for n in present if n not in ours]
    if foreign:
        raise ExportError(f"DEST {dest} holds {len(foreign)} file(s) this export did not write (e.g. "
                          f"{', '.join(foreign[:3])}): remove them or give a new DEST; the export replaces only "
                          f"its own files")
    return ours


def _scan(source, writer) -> list[str]:
    """Every file the export will write, from OUTPUT's small columns, checked before anything is
    written: the latent sizes the trainer's transformer can patchify, and names its loader parses."""
    names, refused = [], None
    for index, (meta, row) in enumerate(iter_rows(source, writer.scan_columns, with_meta=True)):
        shape = meta.get("latent_shape") or source.meta.get("latent_shape")
        if refused is None and shape:
            ratio = max(1, int(row["height"]) // int(shape[2]))
            refused = unpatchifiable(source.meta["vae_class"], (int(shape[2]), int(shape[3])), ratio)
            if refused:
                raise ExportError(f"{refused}; {writer.trainer} would load these latents and fail at the first "
                                  f"step: re-encode OUTPUT with such --height/--width/--buckets")
        names.extend(writer.names(index, row))
    return names


def _delete(dest: str, names, s3) -> None:
    for name in names:
        layout.delete_if_present(storage.join(dest, name), s3)


def export(output: str, dest: str, fmt: str, s3=None, allow_incomplete: bool = False) -> tuple[dict, bool]:
    """Write OUTPUT's clips into DEST in ``fmt``; returns (summary, whether the trainer can use DEST).
    Raises ExportError, before writing anything, when the format cannot express OUTPUT."""
    source = open_output(output, s3)
    _check_family(source.meta, fmt)
    complete = layout.read_json(output, layout.SUCCESS, s3) is not None
    if not complete and not allow_incomplete:
        raise ExportError(f"OUTPUT {output} has no _SUCCESS: its run is not complete (rerun the encode to finish "
                          f"it), or pass --allow-incomplete to export the clips written so far")
    writer = WRITERS[fmt](source, dest, s3)
    previous = _claim(dest, output, fmt, s3)
    names = _scan(source, writer)
    finals = writer.sidecars
    for line in writer.notes:
        log(line)
    if not complete:
        log("OUTPUT has no _SUCCESS (its run is not complete): exporting the clips written so far "
            "(--allow-incomplete)")
    # What makes DEST usable goes first, then what this export will not write again; the list is
    # replaced only then, so that at every moment it names every file of ours that DEST holds.
    _delete(dest, [n for n in finals if n in previous], s3)
    keep = set(names)
    _delete(dest, sorted(previous - keep - set(finals)), s3)
    storage.write_bytes_atomic(storage.join(dest, FILES), "".join(f"{n}\n" for n in [*names, *finals]).encode(), s3)
    layout.write_json(dest, MARKER, {"output": output, "format": fmt, "complete": False}, s3)
    items = 0
    try:
        for items, row in enumerate(iter_rows(source, writer.columns), start=1):
            hooks.reach("export-item", str(items - 1))
            writer.write(items - 1, row)
    finally:
        writer.close()
    for name, data in writer.final_files(items).items():  # last: the trainer can now start
        storage.write_bytes_atomic(storage.join(dest, name), data, s3)
    summary = {"format": fmt, "output": output, "dest": dest, "items": items, "vae_class": source.meta["vae_class"],
               "latent_mode": source.meta["latent_mode"], "output_complete": complete, **writer.summary(),
               "notes": writer.notes, "usable": writer.usable}
    layout.write_json(dest, MARKER, {**summary, "complete": True}, s3)
    return summary, writer.usable


def export_command(output: str, dest: str, fmt: str, s3_endpoint: str | None, allow_incomplete: bool = False) -> int:
    s3 = storage.default_endpoint(s3_endpoint)
    try:
        summary, usable = export(output, dest, fmt, s3, allow_incomplete)
    except ExportError as e:
        log(f"error: {e}")
        return EXIT_USAGE
    print(json.dumps(summary))
    if not usable:
        log(f"wrote {summary['items']} clips' latents, but {WRITERS[fmt].trainer} cannot train on DEST as it is "
            f"(see above)")
        return EXIT_UNUSABLE
    return EXIT_OK


def unpatchifiable_warnings(vae_class: str, ratio: int, sizes) -> list[str]:
    """For ``encode`` and ``plan``: the --height/--width/--buckets (``sizes``, (height, width)) whose
    latents the family's transformer cannot patchify, and the exports that will refuse them."""
    if vae_class not in PATCHIFIED:
        return []
    formats = [f for f in FORMATS if vae_class in FAMILIES[f]]
    then = (f"`video-latents export --format {' / '.join(formats)}` will refuse them" if formats
            else "no export takes them")
    lines = []
    for h, w in sizes:
        why = unpatchifiable(vae_class, (h // ratio, w // ratio), ratio)
        if why:
            lines.append(f"{why}; the diffusers pipeline and the trainers cannot use such latents, and {then}")
    return lines


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
    p.add_argument("--allow-incomplete", action="store_true",
                   help="export an OUTPUT without _SUCCESS (a run not finished): only the clips written so far")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    return p
