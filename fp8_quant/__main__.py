"""Command line: ``python -m fp8_quant demo | inspect FILE | convert IN OUT | sensitivity MODEL_DIR``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from . import demo, sensitivity_cli
from .config import parse_weight_dtype
from .formats import OUTPUT_FORMATS, CheckpointError, convert_checkpoint
from .formats.inspect import format_inspection, inspect_checkpoint
from .scheme import PER_CHANNEL, PER_TENSOR


class ProgressBar:
    """A one-line text progress bar on stderr (no extra dependency)."""

    def __init__(self, label: str, stream=None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.last = 0.0

    def __call__(self, done: int, total: int, name: str = "") -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        width = 30
        filled = int(width * done / max(total, 1))
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name[:50]:50s}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8_quant", description=__doc__)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", help="log kernel choices and details")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", parents=[verbose], help="quantize a small random model; print error and bytes"
    )
    demo_parser.add_argument("--width", type=int, default=512)
    demo_parser.add_argument("--depth", type=int, default=4)
    demo_parser.add_argument("--device", default=None)
    inspect_parser = commands.add_parser("inspect", parents=[verbose], help="describe a safetensors checkpoint")
    inspect_parser.add_argument("file")
    inspect_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    convert_parser = commands.add_parser(
        "convert", parents=[verbose], help="stream a bf16/fp16/fp32 safetensors file into fp8"
    )
    convert_parser.add_argument("input")
    convert_parser.add_argument("output")
    convert_parser.add_argument("--format", choices=OUTPUT_FORMATS, default="comfy-scaled")
    convert_parser.add_argument("--weight-dtype", default="float8_e4m3fn")
    convert_parser.add_argument("--per-channel", action="store_true", help="per-channel scales (weight-scale only)")
    convert_parser.add_argument("--skip", action="append", default=[], help="extra layer pattern to keep (repeat)")
    convert_parser.add_argument("--no-default-skips", action="store_true", help="also quantize norms, heads, ...")
    convert_parser.add_argument("--device", default="cpu", help="where to quantize each tensor (cuda is faster)")
    sensitivity_parser = commands.add_parser(
        "sensitivity",
        parents=[verbose],
        help="per-layer fp8 error of a text encoder (a BERT folder: config.json, vocab.txt, model.safetensors)",
    )
    sensitivity_parser.add_argument("model", help="folder of a BERT-family sentence encoder")
    sensitivity_parser.add_argument("--recipe", choices=("quality", "speed"), default="quality")
    sensitivity_parser.add_argument("--budget", type=float, default=0.55, help="linear bytes / their bf16 bytes")
    sensitivity_parser.add_argument("--prompts", help="text file, one calibration prompt a line (default: built in)")
    sensitivity_parser.add_argument("--plot", default="sensitivity.png", help="PNG to write (needs matplotlib)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return _run(args)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        result = demo.run_demo(args.width, args.depth, device=args.device)
        print(result["summary"])
        print(
            f"device {result['device']}: relative error vs fp32 {result['relative_error']:.4f}; "
            f"linear weights {result['bytes_before'] / 2**20:.1f} MiB -> {result['bytes_after'] / 2**20:.1f} MiB"
        )
    elif args.command == "inspect":
        result = inspect_checkpoint(args.file)
        print(json.dumps(result, indent=1) if args.json else format_inspection(result))
    elif args.command == "convert":
        report = convert_checkpoint(
            args.input,
            args.output,
            args.format,
            weight_dtype=parse_weight_dtype(args.weight_dtype),
            weight_group=PER_CHANNEL if args.per_channel else PER_TENSOR,
            skip_patterns=args.skip,
            default_skips=not args.no_default_skips,
            device=args.device,
            progress=ProgressBar("convert"),
        )
        print(f"{args.output}: {args.format}; {report.summary()}")
    elif args.command == "sensitivity":
        report = sensitivity_cli.run_sensitivity(args.model, args.recipe, args.budget, args.prompts, args.plot)
        print(report.sensitivity.table())
        print(report.summary())
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
