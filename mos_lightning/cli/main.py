"""`python -m mos_lightning SUBCOMMAND ...`: one module per subcommand, each imported only when it runs."""
from __future__ import annotations

import importlib
import sys

# name -> (module in this package, its function, one line for --help)
SUBCOMMANDS = {
    "fit": ("fit", "fit_main", "train every arm of an experiment YAML, then print and write the table"),
    "sample": ("sample", "sample_main", "generate images for prompts from a trained run's checkpoint"),
    "cache": ("cache", "cache_main", "fill the understanding tower's disk cache for a config's captions"),
    "table": ("table", "table_main", "rebuild an experiment's table from its runs' event files"),
    "consolidate": ("consolidate", "consolidate_main", "turn a sharded (FSDP2) checkpoint folder into one file"),
    "describe": ("describe", "describe_main", "a config's parameters, FLOPs and bytes per rank, without weights"),
    "validate": (None, None, "LightningCLI's validate (also test, predict) with the packaged base config"),
}


def usage() -> str:
    lines = ["usage: python -m mos_lightning SUBCOMMAND [--help] [options]", "", "subcommands:"]
    lines += [f"  {name:<10} {text}" for name, (_, _, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def dispatch(args: list[str]):
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return None
    module, function, _ = SUBCOMMANDS.get(args[0], (None, None, None))
    if module is None:
        from .base import MoSCLI

        return MoSCLI(args=args)  # validate, test, predict: LightningCLI's own
    return getattr(importlib.import_module(f".{module}", __package__), function)(args[1:])


def cli_main(args: list[str] | None = None):
    from .base import config_error_in

    args = list(sys.argv[1:] if args is None else args)
    try:
        return dispatch(args)
    except ValueError as err:
        cause = config_error_in(err)
        if cause is None:
            raise
        print(f"mos_lightning: configuration error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
