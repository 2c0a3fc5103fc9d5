"""Preprocess throughput across Ray workers: meshes per second with 1, 2, 4, ... one-CPU workers.

Runs the real stage (`pipeline.preprocess.run`) on the sample corpus against a
fresh local Ray cluster per worker count, each into an empty output, and prints
meshes/s, voxels/s and the scaling efficiency against one worker measured in
the same run.

    python benchmarks/preprocess_workers.py --workers 1,2 --resolutions 64,128,256 --views 4
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--resolutions", default="64,128,256")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--view-size", type=int, default=256)
    ap.add_argument("--meshes-per-task", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="first N corpus files only")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private throwaway cluster per run
    import ray
    from rich.console import Console
    from rich.table import Table

    from pipeline import config
    from pipeline.corpus import generate_corpus
    from pipeline.preprocess import PreprocessConfig, run

    work = tempfile.mkdtemp(prefix="s2bench-")
    corpus = os.path.join(work, "corpus")
    generate_corpus(corpus, seed=0)
    rows = []
    for n in [int(x) for x in args.workers.split(",")]:
        if n > (os.cpu_count() or 1):
            rows.append((n, None, None, None, None))
            continue
        out = os.path.join(work, f"out{n}")
        cfg = config.from_dict(PreprocessConfig, {
            "input": corpus, "output": out, "resolutions": args.resolutions, "views": args.views,
            "view_size": args.view_size, "meshes_per_task": args.meshes_per_task, "limit": args.limit,
            "concurrency": n})
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        result = run(cfg, progress=False)
        seconds = time.perf_counter() - t0
        ray.shutdown()
        ok = result.counts()["ok"]
        voxels = sum(result.manifest.column("num_voxels").to_pylist())
        rows.append((n, ok, seconds, ok / seconds, voxels / seconds))
        shutil.rmtree(out, ignore_errors=True)
    base = next((r[3] for r in rows if r[3]), None)
    t = Table(title=f"preprocess throughput ({platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} CPUs, res {args.resolutions}, {args.views} views of {args.view_size}²)")
    for c in ("workers", "meshes ok", "seconds", "meshes/s", "voxels/s", "scaling efficiency"):
        t.add_column(c, justify="right")
    for n, ok, s, mps, vps in rows:
        if ok is None:
            t.add_row(str(n), "-", "-", "-", "-", "more workers than CPUs here")
            continue
        t.add_row(str(n), str(ok), f"{s:.1f}", f"{mps:.2f}", f"{vps:,.0f}", f"{mps / (base * n):.0%}")
    Console().print(t)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
