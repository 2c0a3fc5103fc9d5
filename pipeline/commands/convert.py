"""``s2 convert``: released weights and older checkpoints -> our checkpoint folders.

    s2 convert official <snapshot dir> <out dir>     the Direct3D-S2 v1.1 snapshot (config.yaml + .ckpt)
    s2 convert checkpoint <run ckpt or weights.pt> <out dir>   a training checkpoint of ours (weights.pt)
"""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert released Direct3D-S2 weights or an older checkpoint to our format")
    csub = p.add_subparsers(dest="what", metavar="WHAT")
    o = csub.add_parser("official", help="a Direct3D-S2 snapshot folder (config.yaml, model_*.ckpt) -> one "
                                         "checkpoint folder per network and a cascade.json")
    o.add_argument("snapshot", help="folder holding config.yaml and the .ckpt files")
    o.add_argument("out", help="output folder (created)")
    o.add_argument("--sections", default="", help="comma-separated config.yaml sections to convert (default: all)")
    o.set_defaults(func=_official)
    c = csub.add_parser("checkpoint", help="a training checkpoint folder or weights.pt -> config.json + "
                                           "model.safetensors")
    c.add_argument("source", help="checkpoint folder (holding weights.pt) or a weights.pt file")
    c.add_argument("out", help="output folder (created)")
    c.set_defaults(func=_checkpoint)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _official(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from model.checkpoint import CheckpointError
    from model.official import OfficialError, convert_snapshot

    console = Console(stderr=True)
    rows = []

    def progress(section, seconds):
        rows.append((section, seconds))
        console.print(f"converted {section} in {seconds:.1f} s")

    sections = [s for s in args.sections.split(",") if s] or None
    try:
        doc = convert_snapshot(args.snapshot, args.out, sections=sections, progress=progress)
    except (OfficialError, CheckpointError) as e:
        print(f"s2 convert official: {e}", file=sys.stderr)
        return 1
    table = Table(title=f"converted {args.snapshot} -> {args.out}")
    for col in ("section", "network", "folder", "seconds"):
        table.add_column(col)
    for section, seconds in rows:
        entry = doc["networks"][section]
        table.add_row(section, entry["network"], entry["path"], f"{seconds:.1f}")
    Console().print(table)
    return 0


def _checkpoint(args) -> int:
    from model.cascade import migrate_checkpoint
    from model.checkpoint import CheckpointError

    try:
        path = migrate_checkpoint(args.source, args.out)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"s2 convert checkpoint: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
