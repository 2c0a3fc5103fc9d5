"""Subcommands of the `s2` command.

Each module here defines ``register(subparsers)`` which adds its subcommand(s)
to the argparse subparsers object and sets ``func`` on them; ``pipeline.cli``
imports every module of this package, so a stage adds its command by adding a
file here, without touching the CLI itself.
"""
