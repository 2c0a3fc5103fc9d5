"""``s2 corpus OUT``: write the deterministic sample mesh corpus and print what it holds."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("corpus", help="write the deterministic sample mesh corpus (meshes, broken files, corpus.json)")
    p.add_argument("out", help="directory to write the corpus into")
    p.add_argument("--seed", type=int, default=0, help="generator seed; the same seed writes byte-identical files")
    p.add_argument(
        "--scale",
        choices=("sample", "large"),
        default="sample",
        help="sample: ~50 small meshes for tests; large: three bigger variants of each, for benchmarks",
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipeline.corpus import generate_corpus

    report = generate_corpus(args.out, seed=args.seed, scale=args.scale)
    counts = report.summary()
    table = Table(title=f"corpus in {report.out_dir} (seed {report.seed}, {report.scale})")
    table.add_column("group")
    table.add_column("name")
    table.add_column("files", justify="right")
    for group in ("kind", "format", "broken"):
        for name, n in sorted(counts[group].items()):
            table.add_row(group, name, str(n))
    Console().print(table)
    print(f"{len(report.valid)} valid meshes, {len(report.broken)} broken files; index: {report.out_dir}/corpus.json")
    return 0
