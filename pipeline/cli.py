"""The ``s2`` command. Each module in ``pipeline.commands`` adds its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from pipeline.config import ConfigError, Parser


def build_parser() -> argparse.ArgumentParser:
    import pipeline.commands as commands

    # Parser: a subcommand's flags (and the imports they need) are built only when it is used.
    parser = Parser(prog="s2", description="Sparse-SDF image-to-3D on Ray")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"pipeline.commands.{info.name}")
        register = getattr(module, "register", None)
        if callable(register):
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pipeline.ray_address import auth_env

    auth_env(strict=False)  # token auth as Ray reads it, set before a command imports Ray
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"s2 {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
