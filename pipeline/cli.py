"""Argument parsing only: ``python -m pipeline encode|demo|...`` (also the ``video-latents`` script).

Exit codes: 0 the run is complete (inputs that failed for their own reasons are listed in
OUTPUT/errors); 1 the run failed (a systemic failure, the error-rate guard, or inputs whose
retries were spent, or OUTPUT's lease lost to another run), with one line naming the cause; 2 a
usage error, including OUTPUT holding a job with other settings, or another live run writing into
it (stderr says what to change).
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback

from pipeline import failures, storage
from pipeline.commands import export
from pipeline.config import (DEFAULT_EXTENSIONS, DEVICES, DTYPES, LATENT_DTYPES, LATENT_MODES, MEMORY_FORMATS,
                             RESIZE_MODES, Config, ConfigError, validate)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PLAN_OUTPUT = "(plan: nothing is written)"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _num_actors(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN[,MAX], got {text!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected MIN[,MAX], got {text!r}")
    return (parts[0], parts[-1])


def _buckets(text: str) -> tuple[tuple[int, int], ...]:
    try:
        sizes = tuple(tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW[,HxW...], got {text!r}") from None
    if not sizes or any(len(s) != 2 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected HxW[,HxW...], got {text!r}")
    return sizes


def _batch_size(text: str) -> int | None:
    if str(text).lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _extensions(text: str) -> tuple[str, ...]:
    return tuple(e.strip().lstrip(".").lower() for e in text.split(",") if e.strip())


def _add_encode_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", nargs="?", help="s3://bucket/prefix/, a local folder, or one file")
    p.add_argument("output", metavar="OUTPUT", nargs="?", help="s3://bucket/prefix/ or a local folder")
    p.add_argument("--config", metavar="JOB.yaml",
                   help="a YAML file of these options (input, output, model, num_frames, ...); "
                        "options on the command line override it")
    p.add_argument("--model",
                   help="(required) a local diffusers model folder, a hub id, or an s3:// URI of a saved model")
    p.add_argument("--subfolder", default=None, help="the VAE's subfolder (default: vae/ when present)")
    p.add_argument("--num-frames", type=int, default=49, help="frames per clip (default 49)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                   help="crop: cover the target keeping aspect, then centre-crop; stretch: resize straight")
    p.add_argument("--clip-stride", type=int, default=None,
                   help="source frames between clip starts (default: --num-frames)")
    p.add_argument("--max-clips", type=int, default=None, help="clips per video (default: no limit)")
    p.add_argument("--latent-mode", choices=LATENT_MODES, default="mode")
    p.add_argument("--seed", type=int, default=0, help="seed for --latent-mode sample")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--latent-dtype", choices=LATENT_DTYPES, default="float16", help="storage dtype")
    p.add_argument("--batch-size", type=_batch_size, default=None, metavar="N|auto",
                   help="clips per VAE call (default auto: 2 on CPU, the best in the sweep; on CUDA the "
                        "largest that fits in the actor's share of its GPU's memory with headroom, found once when an "
                        "actor starts)")
    p.add_argument("--memory-format", choices=MEMORY_FORMATS, default="auto",
                   help="the VAE's tensors: auto is channels_last_3d on CPU (faster there, measured), "
                        "contiguous on CUDA")
    p.add_argument("--decode-cpus", type=float, default=1.0,
                   help="CPUs per decode task, and FFmpeg threads in it (default 1; more for 4K sources)")
    p.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="torch threads of each CPU encoder actor (default: the node's CPUs as Ray counts "
                        "them). The latents' last bits depend on it: pin it for bit-identical reruns on "
                        "nodes of other sizes")
    p.add_argument("--clips-per-task", type=int, default=64, metavar="N",
                   help="a video with more clips is cut into parts of N clips, decoded by separate tasks "
                        "that seek to their part (constant frame rate videos; default 64, 0: never split)")
    p.add_argument("--rows-per-file", type=int, default=None, metavar="N",
                   help="clips per output file (default: about 256 MiB of latents per file, from the "
                        "latent shape and dtype; Parquet row groups of about 32 MiB)")
    p.add_argument("--num-actors", type=_num_actors, default=None, metavar="MIN[,MAX]",
                   help="size of the autoscaling actor pool (default: 1 up to the GPUs the cluster has "
                        "or can grow to, divided by --gpus-per-actor)")
    p.add_argument("--gpus-per-actor", type=float, default=1.0)
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: cuda when the cluster has GPUs or its autoscaler can add them, else cpu")
    p.add_argument("--cluster-config", metavar="CLUSTER.yaml", default=None,
                   help="the Ray autoscaler config or the KubeRay RayCluster manifest, to size the encoder "
                        "pool by what the cluster can grow to (default: the autoscaler's own view where "
                        "Ray or KubeRay exposes it, else the config `ray up` leaves on the head node)")
    p.add_argument("--tiling", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--slicing", action=argparse.BooleanOptionalAction, default=False)
    text = p.add_argument_group("for trainers: prompt embeddings and image-to-video latents")
    text.add_argument("--text-embeddings", action="store_true",
                      help="add prompt_embeds [L, D] per clip (and prompt_attention_mask where the family's "
                           "pipeline uses one), computed as the family's diffusers pipeline computes them")
    text.add_argument("--text-encoder", metavar="PATH", default=None,
                      help="folder (local or s3://) holding text_encoder/ and tokenizer/ (default: --model)")
    text.add_argument("--caption-column", default=None,
                      help="the --manifest column holding the captions (default: caption, when the "
                           "manifest has one); an empty cell, or no manifest, takes the .txt file beside "
                           "each video")
    text.add_argument("--text-max-length", type=int, default=None, metavar="L",
                      help="tokens (default: the pipeline's: CogVideoX 226, Mochi 256, LTX-Video 128, Wan 512, "
                           "HunyuanVideo 256, HunyuanVideo 1.5 1000, LTX-2 1024)")
    text.add_argument("--text-gpus", type=float, default=None, metavar="FRACTION",
                      help="on cuda, the share of each encoder slot's GPU that its text encoder actor takes "
                           "(default: the family's, 0.25 for the T5 families, 0.5 for LTX-2 and the "
                           "HunyuanVideos; the VAE actor gets the rest)")
    text.add_argument("--image-latents", action="store_true",
                      help="add image_latents [1, C, h, w]: each clip's first frame encoded alone and "
                           "normalised as the family's image-to-video pipeline does")
    text.add_argument("--audio-latents", action="store_true",
                      help="LTX-2: add audio_latents [C, L, M]: each clip's audio span (num_frames / fps seconds) "
                           "encoded by the model's audio_vae/ as the LTX-2 trainer prepares it; a video without "
                           "audio gets an error row")
    p.add_argument("--extensions", type=_extensions, default=DEFAULT_EXTENSIONS,
                   help=f"comma-separated, any case (default {','.join(DEFAULT_EXTENSIONS)})")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--manifest", metavar="FILE",
                   help="CSV, JSONL or Parquet (local or s3://) with a `uri` column, optional "
                        "start_sec/end_sec (one clip per row) and any other columns, which are copied "
                        "into the output rows; replaces INPUT")
    p.add_argument("--fps", type=float, default=None, help="resample frames to this rate before cutting clips")
    scenes = p.add_argument_group("shots")
    scenes.add_argument("--split-scenes", action="store_true",
                        help="find shot boundaries (hard cuts) while decoding and cut clips within shots only: "
                             "each shot is clipped from its first frame, with --clip-stride and --max-clips per "
                             "shot; a shot shorter than one clip gives none. Fades and dissolves are not cut")
    scenes.add_argument("--scene-threshold", type=float, default=2.4, metavar="RATIO",
                        help="a frame starts a shot when its content score (PySceneDetect's: the mean change "
                             "of hue, saturation and value from the frame before, 0-255; at least 15) is this "
                             "many times the mean of the 2 frames' scores on each side (PySceneDetect's "
                             "AdaptiveDetector, whose default is 3; default 2.4)")
    scenes.add_argument("--min-shot-frames", type=int, default=15, metavar="N",
                        help="no cut within N frames after a frame that met the threshold: shots between cuts "
                             "are at least N frames, and a flash gives one cut (default 15)")
    p.add_argument("--buckets", type=_buckets, default=(), metavar="HxW[,HxW...]",
                   help="aspect-ratio buckets, e.g. 480x720,720x480: each video is encoded at the one "
                        "nearest its aspect ratio (replaces --height/--width)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh, deleting a previous run's output (default: resume it)")
    p.add_argument("--allow-version-change", action="store_true",
                   help="resume an OUTPUT written under another diffusers or torch major.minor (refused by "
                        "default: its latents may differ); the change is listed in OUTPUT/_job.json")
    p.add_argument("--retry-errors", action="store_true",
                   help="also retry inputs whose errors are final, e.g. after a decoder upgrade "
                        "(retryable errors are always retried)")
    p.add_argument("--max-error-rate", type=float, default=0.5, metavar="RATE",
                   help="stop (exit 1) once more than this share of inputs, or of clips, failed, "
                        "judged after 20 outcomes (default 0.5; 1 turns the guard off)")
    p.add_argument("--s3-max-attempts", type=int, default=10,
                   help="attempts per S3 request, with exponential backoff (default 10)")
    limits = p.add_argument_group("limits on untrusted inputs")
    limits.add_argument("--max-pixels", type=int, default=4096 * 4096, help="per frame (default 4096*4096)")
    limits.add_argument("--max-duration", type=float, default=4 * 3600.0, help="seconds (default 4 h)")
    limits.add_argument("--max-bytes", type=int, default=32 << 30, help="file size (default 32 GiB)")
    limits.add_argument("--decode-timeout", type=float, default=1800.0,
                        help="seconds of decoding per video before it becomes an error row")
    limits.add_argument("--allow-pickle", action="store_true",
                        help="load .bin/.pt weights (pickle can run code; default: safetensors only)")
    limits.add_argument("--force", action="store_true", help="allow OUTPUT inside INPUT")


def build_parser(job_file_defaults: dict | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="video-latents", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    encode_parser = sub.add_parser("encode", help="encode videos to VAE latents")
    _add_encode_options(encode_parser)
    if job_file_defaults:
        encode_parser.set_defaults(**job_file_defaults)
    plan = sub.add_parser("plan", help="what an encode with these options would do, from the containers' "
                                       "headers (no model load, no GPU, nothing written)")
    _add_encode_options(plan)
    plan.add_argument("--clips-per-s", type=float, default=None,
                      help="measured clips/s per GPU at this clip size, for the GPU-hours estimate")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    if job_file_defaults:
        plan.set_defaults(**job_file_defaults)
    demo = sub.add_parser("demo", help="generate sample videos and a tiny VAE, then encode them locally")
    demo.add_argument("--workdir", default="demo-output", help="where inputs and outputs go")
    prev = sub.add_parser("preview", help="decode a sample of latents back and compare with the source")
    prev.add_argument("output", metavar="OUTPUT")
    prev.add_argument("--model", required=True, help="the VAE the run used")
    prev.add_argument("--n", type=int, default=8, help="clips to preview")
    prev.add_argument("--out", default=None, help="where to write (default OUTPUT/preview/)")
    prev.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    prev.add_argument("--s3-endpoint", default=None)
    info = sub.add_parser("inspect", help="summarise an OUTPUT: rows, shapes, model, errors, throughput")
    info.add_argument("output", metavar="OUTPUT")
    info.add_argument("--s3-endpoint", default=None)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    export.add_parser(sub)
    return parser


def job_file_defaults(argv: list[str]) -> dict:
    """Options from ``--config JOB.yaml`` (local or S3), as parser defaults; {} without one.

    Keys are the long options' names, with ``_`` or ``-``; values as YAML reads them.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--s3-endpoint")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return {}
    import yaml

    endpoint = storage.default_endpoint(known.s3_endpoint)
    try:
        loaded = yaml.safe_load(storage.read_bytes(known.config, endpoint)) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {known.config}: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {known.config}: expected a mapping of option: value")
    probe = argparse.ArgumentParser(add_help=False)
    _add_encode_options(probe)
    actions = {a.dest: a for a in probe._actions}  # noqa: SLF001 - the option table argparse built
    out = {}
    for key, value in loaded.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest in ("help", "config"):
            raise ConfigError(f"--config {known.config}: unknown option {key!r}")
        action = actions[dest]
        try:
            if action.type in (_num_actors, _extensions, _buckets, _batch_size):  # "1,4" or [1, 4], as on the command line
                value = action.type(",".join(map(str, value)) if isinstance(value, list) else str(value))
            elif action.type is not None and not isinstance(value, bool):
                value = action.type(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise ConfigError(f"--config {known.config}: bad value for {key}: {value!r}") from None
        out[dest] = value
    return out


def config_from_args(args: argparse.Namespace) -> Config:
    manifest = getattr(args, "manifest", None)
    if args.command == "plan":  # nothing is written: no OUTPUT
        args.input = None if manifest else args.input
        args.output = PLAN_OUTPUT
    elif manifest and args.output is None:  # `encode OUTPUT --manifest m.csv`
        args.input, args.output = None, args.input
    required = ("output", "model") if getattr(args, "manifest", None) else ("input", "output", "model")
    missing = [name for name in required if not getattr(args, name, None)]
    if missing:
        raise ConfigError(f"missing {', '.join(m.upper() if m != 'model' else '--model' for m in missing)} "
                          "(give it on the command line or in --config)")
    fields = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}
    fields["s3_endpoint"] = storage.default_endpoint(args.s3_endpoint)
    if isinstance(fields.get("num_actors"), list):
        fields["num_actors"] = tuple(fields["num_actors"])
    if fields.get("buckets"):  # the first bucket stands for the run's size in its summary
        fields["height"], fields["width"] = fields["buckets"][0]
    return Config(**fields)


def _warn_unpatchifiable(cfg: Config, info) -> None:
    """Sizes whose latents the family's transformer cannot patchify: a warning, since the latents
    themselves are fine (another use may not patchify them)."""
    for line in export.unpatchifiable_warnings(info.class_name, info.spatial_ratio,
                                               cfg.buckets or ((cfg.height, cfg.width),)):
        print(f"video-latents: warning: {line}", file=sys.stderr)


def encode(cfg: Config) -> int:
    from pipeline.failures import RunFailed
    from pipeline.run import run

    try:
        cfg, info = validate(cfg)
        _warn_unpatchifiable(cfg, info)
        summary = run(cfg, info)  # the job's identity is checked there, under OUTPUT's lease
    except ConfigError as e:
        print(f"video-latents: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as e:
        print(f"video-latents: run failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - the run failed: say so, with the trace for a bug report
        traceback.print_exc()
        print(f"video-latents: run failed: {type(e).__name__}: {failures.first_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(summary))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(job_file_defaults(argv)).parse_args(argv)
        if args.command == "demo":
            from pipeline.demo import demo

            return demo(args.workdir)
        if args.command == "preview":
            from pipeline.preview import preview_command

            return preview_command(args.output, args.model, args.n, args.out, args.s3_endpoint, args.device)
        if args.command == "inspect":
            from pipeline.report import inspect_command

            return inspect_command(args.output, args.s3_endpoint, args.json)
        if args.command == "export":  # exit codes as pipeline.commands.export documents them
            return export.export_command(args.output, args.dest, args.format, args.s3_endpoint,
                                         args.allow_incomplete)
        cfg = config_from_args(args)
        if args.command == "plan":
            from pipeline.commands.plan import plan_command

            cfg, info = validate(cfg)
            _warn_unpatchifiable(cfg, info)
            return plan_command(cfg, info, args.clips_per_s, args.json)
    except ConfigError as e:
        print(f"video-latents: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return encode(cfg)
