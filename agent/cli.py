"""Command-line entry point: parses flags (with env twins) and dispatches to subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from agent import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spegla",
        description="Node agent that makes every Kubernetes node a pull-only OCI registry mirror.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    version = sub.add_parser("version", help="print the version and exit")
    version.add_argument("--format", choices=["text", "json"], default="text")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        if args.format == "json":
            print(json.dumps({"version": __version__, "python": sys.version.split()[0]}))
        else:
            print(f"spegla {__version__}")
        return 0
    return 2
