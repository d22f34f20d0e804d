"""Command line: ``fp8-quant demo | inspect FILE | convert IN OUT | sensitivity MODEL_DIR`` (also
``python -m fp8_quant``).

A mistake is one line, ``error: <file>: <cause>``, and exit status 2: someone converting a 30 GB checkpoint needs
to know which file and why, not a traceback. Ctrl-C or SIGTERM during ``convert`` leaves no partial output (exit
status 128 + the signal's number, as shells expect), and an existing output is only replaced with ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch

from . import demo, sensitivity_cli
from .config import WEIGHT_DTYPES, check_patterns, parse_weight_dtype
from .formats import DEFAULT_OUTPUT_FORMAT, OUTPUT_DIALECTS, OUTPUT_FORMATS, CheckpointError, convert_checkpoint
from .formats.calibration import read_input_scales
from .formats.dialects import written_by
from .formats.inspect import format_inspection, inspect_checkpoint
from .messages import printable
from .scheme import PER_CHANNEL, PER_TENSOR
from .text_encoder import DEFAULT_BUDGET, RECIPES, quantize_text_encoder

EXIT_ERROR = 2


class Interrupted(Exception):
    """A signal that ends the program, raised where Python was so that cleanup (``finally``) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class ProgressBar:
    """A one-line text progress bar on stderr (no extra dependency); only for a terminal, not a log file."""

    def __init__(self, label: str, stream=None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.last = 0.0
        self.open_line = False

    def __call__(self, done: int, total: int, name: str = "") -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        width = 30
        filled = int(width * done / max(total, 1))
        shown = printable(name)[:50]
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {shown:50s}")
        self.open_line = done < total
        if not self.open_line:
            self.stream.write("\n")
        self.stream.flush()

    def end(self) -> None:
        """End a bar cut short, so that the error after it starts on a line of its own."""
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False


def _default(function, name: str):
    """A default of the core's own signature, so that the CLI never restates it as a literal."""
    return inspect.signature(function).parameters[name].default


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fp8-quant",
        description="Quantize models to FP8: try it on a random model (demo), describe a checkpoint (inspect), "
        "write an fp8 checkpoint (convert), or measure a text encoder's per-layer fp8 error (sensitivity).",
    )
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", help="log kernel choices and details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo", parents=[verbose], help="quantize a small random model; print error and bytes",
        description="Quantize a small random MLP stack; print its error vs fp32 and its bytes vs bf16.",
    )
    demo_parser.add_argument(
        "--width", type=_positive_int, default=_default(demo.run_demo, "width"), help="width (default: %(default)s)"
    )
    demo_parser.add_argument(
        "--depth", type=_positive_int, default=_default(demo.run_demo, "depth"), help="blocks (default: %(default)s)"
    )
    demo_parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if there is one)")
    inspect_parser = commands.add_parser(
        "inspect", parents=[verbose], help="describe a safetensors checkpoint",
        description="Describe a safetensors checkpoint: its dialect, layers, scales and what Load FP8 DiT makes of it.",
    )
    inspect_parser.add_argument("file", help="a .safetensors file")
    inspect_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    convert_parser = commands.add_parser(
        "convert", parents=[verbose], help="stream a bf16/fp16/fp32 safetensors file into fp8",
        description="Stream a bf16/fp16/fp32 safetensors file into an fp8 one, layer by layer.",
    )
    convert_parser.add_argument("input", help="the bf16/fp16/fp32 .safetensors file")
    convert_parser.add_argument("output", help="the fp8 .safetensors file to write")
    convert_parser.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default=str(DEFAULT_OUTPUT_FORMAT),
        help="; ".join(f"{dialect}: {dialect.summary}" for dialect in OUTPUT_DIALECTS) + " (default: %(default)s)",
    )
    convert_parser.add_argument(
        "--weight-dtype",
        default=str(_default(convert_checkpoint, "weight_dtype")).removeprefix("torch."),
        help=f"fp8 type of the weights: {', '.join(WEIGHT_DTYPES)} (default: %(default)s)",
    )
    per_channel_dialects = written_by(lambda dialect: dialect.holds_group(PER_CHANNEL))
    convert_parser.add_argument(
        "--per-channel", action="store_true", help=f"per-channel scales ({per_channel_dialects} only)"
    )
    convert_parser.add_argument("--skip", action="append", default=[], help="extra layer pattern to keep (repeat)")
    convert_parser.add_argument("--no-default-skips", action="store_true", help="also quantize norms, heads, ...")
    convert_parser.add_argument(
        "--device",
        default=_default(convert_checkpoint, "device"),
        help="where to quantize each tensor; cuda is faster (default: %(default)s)",
    )
    convert_parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    convert_parser.add_argument(
        "--calibrated",
        metavar="FILE",
        default=None,
        help="write calibrated input scales taken from FILE: an fp8 checkpoint with input scales (e.g. one saved by "
        "Save FP8 Model after a sampling step) or a JSON {layer: scale}",
    )
    sensitivity_parser = commands.add_parser(
        "sensitivity",
        parents=[verbose],
        help="per-layer fp8 error of a text encoder (a BERT folder: config.json, vocab.txt, model.safetensors)",
        description="Fit a BERT-family text encoder by a recipe and show each layer's fp8 error and what stays bf16.",
    )
    sensitivity_parser.add_argument(
        "model", help="folder of a BERT-family sentence encoder (config.json, vocab.txt, model.safetensors)"
    )
    sensitivity_parser.add_argument(
        "--recipe",
        choices=[recipe for recipe in RECIPES if recipe != "plain"],  # plain fits nothing: no table to show
        default=_default(quantize_text_encoder, "recipe"),
        help="how the encoder is fitted, as in Quantize Text Encoder (FP8) (default: %(default)s)",
    )
    sensitivity_parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET,
        help="linear weight bytes at most this share of their bf16 bytes (default: %(default)s)",
    )
    sensitivity_parser.add_argument("--prompts", help="text file, one calibration prompt a line (default: built in)")
    sensitivity_parser.add_argument(
        "--plot", default="sensitivity.png", help="PNG to write (needs matplotlib), or none (default: %(default)s)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return _run(args)
    except (CheckpointError, ValueError) as error:
        return _fail(str(error))
    except OSError as error:  # the disk filled up, a folder is read-only, ...
        return _fail(f"{error.filename}: {error.strerror}" if error.filename else str(error))
    except (Interrupted, KeyboardInterrupt) as error:
        signum = error.signum if isinstance(error, Interrupted) else signal.SIGINT
        where = f"{printable(args.output)}: " if args.command == "convert" else ""
        print(f"error: {where}interrupted by {signal.Signals(signum).name}; nothing written", file=sys.stderr)
        return 128 + signum
    except Exception as error:  # a case no check above foresaw: still one line, naming what was being read
        if args.verbose:
            traceback.print_exc()
        subject = getattr(args, "file", None) or getattr(args, "input", None) or getattr(args, "model", None)
        where = f"{subject}: " if subject else ""
        return _fail(f"{where}{type(error).__name__}: {error} (run with -v for the traceback)")


def _positive_int(text: str) -> int:
    value = int(text) if text.strip().lstrip("+").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _fail(message: str) -> int:
    print(f"error: {printable(message)}", file=sys.stderr)
    return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        _check_device(args.device, "demo")
        result = demo.run_demo(args.width, args.depth, device=args.device)
        print(result["summary"])
        print(
            f"device {result['device']}: relative error vs fp32 {result['relative_error']:.4f}; "
            f"linear weights {result['bytes_after'] / 2**20:.1f} MiB vs {result['bf16_bytes'] / 2**20:.1f} MiB in bf16 "
            f"({result['bytes_after'] / result['bf16_bytes']:.2f}x)"
        )
    elif args.command == "inspect":
        _check_input(args.file)
        result = inspect_checkpoint(args.file)
        print(json.dumps(result, indent=1) if args.json else format_inspection(result))
    elif args.command == "convert":
        _convert(args)
    elif args.command == "sensitivity":
        plot = None if args.plot.lower() == "none" else args.plot
        sensitivity_cli.check_folder(args.model)
        if plot is not None:
            sensitivity_cli.check_plot_possible()
        report = sensitivity_cli.run_sensitivity(args.model, args.recipe, args.budget, args.prompts)
        print(report.sensitivity.table())
        print(report.summary())
        if plot is not None:
            report.sensitivity.plot(plot)
            print(f"plot: {plot}")
    return 0


def _check_input(path: str) -> None:
    if Path(path).is_dir():
        raise CheckpointError(f"{path}: is a directory, not a .safetensors file")


def _check_device(name: str | None, subject: str) -> None:
    """A device torch cannot use is the user's error, said before any work, not a CUDA traceback midway."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{subject}: --device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch finds no CUDA GPU"
        raise ValueError(f"{subject}: --device {name}, but {why}; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{subject}: --device {name}, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")


def _convert(args: argparse.Namespace) -> None:
    skips = check_patterns("--skip", args.skip)  # a bad pattern is the option's error, before any file is read
    _check_input(args.input)
    _check_device(args.device, args.input)
    try:
        weight_dtype = parse_weight_dtype(args.weight_dtype)
    except ValueError:
        raise ValueError(
            f"--weight-dtype {args.weight_dtype!r} is not allowed; allowed values: {', '.join(WEIGHT_DTYPES)}"
        ) from None
    if Path(args.output).is_file() and not args.force:
        raise CheckpointError(f"{args.output}: already exists; pass --force to replace it")
    progress = ProgressBar("convert") if sys.stderr.isatty() else None
    try:
        with _signals_raise(signal.SIGTERM):
            report = convert_checkpoint(
                args.input,
                args.output,
                args.format,
                weight_dtype=weight_dtype,
                weight_group=PER_CHANNEL if args.per_channel else PER_TENSOR,
                skip_patterns=skips,
                default_skips=not args.no_default_skips,
                device=args.device,
                progress=progress,
                input_scales=read_input_scales(args.calibrated) if args.calibrated else None,
                overwrite=args.force,
            )
    finally:
        if progress is not None:
            progress.end()
    for pattern in report.unmatched_skips:
        print(f"warning: --skip {pattern!r} matches no layer of {printable(args.input)}", file=sys.stderr)
    print(f"{printable(args.output)}: {args.format}; {report.summary()}")


@contextlib.contextmanager
def _signals_raise(*signums: int) -> Iterator[None]:
    """Within the block, the given signals raise ``Interrupted``: their default would end the process at once,
    past the writer's cleanup of its partial file. Only the main thread can install signal handlers."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, _raise_interrupted) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


if __name__ == "__main__":
    sys.exit(main())
