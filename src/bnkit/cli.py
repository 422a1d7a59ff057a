"""``bnkit ...``: parses arguments, calls the library, prints. Nothing else."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import bnkit

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``bnkit`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="bnkit",
        description="bnkit: a from-scratch BatchNorm for PyTorch and tools for its pitfalls.",
    )
    parser.add_argument("--version", action="version", version=f"bnkit {bnkit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="print versions and the backends bnkit can use")
    info.set_defaults(func=_cmd_info)
    return parser


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import numpy
    import torch

    print(f"bnkit {bnkit.__version__}")
    print(
        f"torch {torch.__version__}  numpy {numpy.__version__}  python {platform.python_version()}"
    )
    print(f"threads {torch.get_num_threads()}  cuda {torch.cuda.is_available()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnkit`` console command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("bnkit: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"bnkit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
