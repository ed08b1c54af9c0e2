"""Command line: ``python -m screener_nb <command> ...``.

    run       execute the notebooks headless (papermill) into a run directory
    train     train one stage directly (also under torchrun for DDP)
    data      check dataset manifests / fetch the real sample cohort
    bench     print speed and memory figures (train, inference, metrics, phantoms)
    compare   metrics of two or more runs side by side
    figures   an evaluated run's anomaly-map and ROC/PRO figures as PNGs (for the README)
    params    list a stage's parameters and their defaults per profile
    envcheck  check that pyproject and the conda/Binder environment files agree

Heavy imports happen inside the commands so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import ScreenerError


def _kv(items: list[str] | None) -> dict:
    from .config import parse_cli_value
    from .errors import ConfigError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"-p expects key=value, found {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_cli_value(value)
    return out


def _cmd_run(args) -> int:
    from .runner import run

    run(args.out, profile=args.profile, params=_kv(args.param), stages=args.stages, force=args.force,
        param_file=args.file, progress_bar=args.progress)
    return 0


def _cmd_train(args) -> int:
    from . import config
    from .stages import train_stage

    cfg = config.resolve(args.stage, run_dir=args.run, **_kv(args.param))
    train_stage(args.stage, cfg)
    return 0


def _cmd_data(args) -> int:
    if args.action == "check":
        from .data.status import main_check

        return main_check(args.rest) or 0
    from .data.samples import main_fetch

    return main_fetch(args.rest) or 0


def _cmd_bench(args) -> int:
    try:
        module = importlib.import_module(f"screener_nb.benchmarks.{args.name}")
    except ModuleNotFoundError:
        import pkgutil

        from . import benchmarks

        names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))
        print(f"unknown benchmark {args.name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    return module.main(args.rest) or 0


def _cmd_compare(args) -> int:
    from .results import main_compare

    return main_compare(args.runs, html=args.html) or 0


def _cmd_figures(args) -> int:
    from .viz.run_figures import main

    return main(args.rest) or 0


def _cmd_params(args) -> int:
    from . import config

    print(f"parameters of stage {args.stage!r} (defaults quick / demo / full):")
    print(config.describe(args.stage))
    return 0


def _cmd_envcheck(args) -> int:
    from .envcheck import main

    return main(["--root", args.root] if args.root else []) or 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m screener_nb", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="execute the notebooks headless into a run directory")
    p.add_argument("--profile", default="quick", choices=["quick", "demo", "full"])
    p.add_argument("--out", required=True, help="run directory, e.g. runs/demo")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="override a parameter (repeatable)")
    p.add_argument("-f", "--file", help="YAML file of parameters (stored with the run)")
    p.add_argument("--stages", help="subset, e.g. 01,02 or 01-04 or data,descriptor (default 00-06)")
    p.add_argument("--force", help="stages to redo although completed (old outputs kept in .replaced/)")
    p.add_argument("--progress", action="store_true", help="also show papermill's bar over each notebook's cells")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("train", help="train one stage (works under torchrun)")
    p.add_argument("stage", choices=["descriptor", "condition", "density", "distill"])
    p.add_argument("--run", required=True, help="run directory (its data stage must be done)")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("data", help="dataset manifests and the real sample cohort")
    p.add_argument("action", choices=["check", "samples"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("bench", help="speed and memory figures")
    p.add_argument("name", help="train | inference | metrics | phantoms | pairs")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("compare", help="metrics of runs side by side")
    p.add_argument("runs", nargs="+")
    p.add_argument("--html", help="also write a plotly comparison figure here")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("figures", help="an evaluated run's anomaly-map and ROC/PRO figures as PNGs (RUN OUT_DIR)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_figures)

    p = sub.add_parser("params", help="a stage's parameters")
    p.add_argument("stage")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("envcheck", help="pyproject vs environment.yml vs binder/environment.yml")
    p.add_argument("--root", help="repository root holding pyproject.toml (default: this package's)")
    p.set_defaults(func=_cmd_envcheck)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ScreenerError as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
