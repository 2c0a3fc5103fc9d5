"""``s2 demo``: the main job on the bundled sample corpus, on a local Ray cluster.

Generates the sample corpus, starts a local Ray cluster with token auth (unless
``RAY_ADDRESS`` names a running one), submits ``jobs/preprocess.yaml`` with the
corpus as input through the job submission API, streams its logs and prints
where the shards are. The cluster it started is stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def register(sub) -> None:
    p = sub.add_parser("demo", help="generate the sample corpus and preprocess it on a local Ray cluster")
    p.add_argument("--data", default=str(ROOT / "data"), help="folder for the corpus and the dataset")
    p.add_argument("--resolutions", default="64,128,256")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--view-size", type=int, default=256)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    p.add_argument("--keep-cluster", action="store_true", help="leave the cluster running afterwards")
    p.set_defaults(func=_run)


def _start_cluster(num_cpus: int | None, env: dict[str, str]) -> str:
    from pipeline.commands.cluster import ensure_token

    ensure_token(env)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray, "start", "--head", "--disable-usage-stats", "--dashboard-host", "127.0.0.1"]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return "http://127.0.0.1:8265"


def _run(args) -> int:
    from pipeline import jobs
    from pipeline.corpus import generate_corpus

    data = Path(args.data).resolve()
    corpus, dataset = data / "corpus", data / "dataset"
    t0 = time.time()
    report = generate_corpus(corpus, seed=0)
    valid = sum(e.valid for e in report.entries)
    print(f"sample corpus: {valid} meshes and {len(report.entries) - valid} broken files in {corpus}")

    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("RAY_AUTH_MODE", "token")
    address = env.get("RAY_ADDRESS")
    started = False
    if not address:
        address = _start_cluster(args.num_cpus, env)
        started = True
        print(f"local Ray cluster started at {address} (token auth)")
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "PATH")})
    try:
        spec = jobs.with_overrides(jobs.load_job_spec(ROOT / "jobs" / "preprocess.yaml"), [
            f"input={corpus}", f"output={dataset}", f"resolutions={args.resolutions}", f"views={args.views}",
            f"view_size={args.view_size}", "memory_per_task_gb=none"])
        jobs.check_entrypoint(spec)
        status = jobs.submit(spec, address=address)
    finally:
        if started and not args.keep_cluster:
            ray = os.path.join(os.path.dirname(sys.executable), "ray")
            subprocess.run([ray, "stop"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"\njob {status} in {time.time() - t0:.0f} s; shards, manifest.parquet and errors.parquet are in {dataset}")
    return 0 if status == "SUCCEEDED" else 1
