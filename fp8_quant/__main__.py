"""Command line: ``python -m fp8_quant demo``."""

from __future__ import annotations

import argparse
import logging
import sys

from . import demo


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "demo":
        result = demo.run_demo(args.width, args.depth, device=args.device)
        print(result["summary"])
        print(
            f"device {result['device']}: relative error vs fp32 {result['relative_error']:.4f}; "
            f"linear weights {result['bytes_before'] / 2**20:.1f} MiB -> {result['bytes_after'] / 2**20:.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
