"""SS-VAE training on the sample corpus at 256³ then 512³: the paper's reconstruction columns.

Writes the sample corpus, preprocesses it into shards (Ray Data, local cluster) at the given
resolutions without condition views, trains the VAE one resolution after the other on the one
training loop (``python -m pipeline.train vae``: one process, DeepSpeed, no Ray), each stage starting
from the previous one's EMA weights as the paper's curriculum does, and prints the held-out
reconstruction table (Chamfer, F1@0.005, F1@0.001, normal consistency) of every stage beside the
weights it started from (untrained for the first stage), the baseline measured in the same run.

    python benchmarks/vae_train.py --work /tmp/vaerun --res 256,512 --steps 2000,1000 --token-budget 400000,300000

Each stage is one ``python -m pipeline.train vae`` process (its command is printed and can be rerun
alone). Rerunning with the same ``--work`` reuses the shards and every stage whose last checkpoint
holds ``eval.json``; a stage cut short resumes from its newest checkpoint. Delete a stage's run folder
(``<work>/runs/vae<res>``) to train it again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = ("chamfer", "f1@0.005", "f1@0.001", "normal_consistency")


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.stdout.write(log.read_text()[-4000:])
        raise SystemExit(f"{cmd[1]} failed with exit code {proc.returncode} (log: {log})")


def per_list(text: str, n: int, cast) -> list:
    items = [cast(x) for x in text.split(",") if x.strip()]
    if len(items) == 1:
        items *= n
    if len(items) != n:
        raise SystemExit(f"expected 1 or {n} comma-separated values, got {text!r}")
    return items


def last_checkpoint(run: Path) -> Path | None:
    found = sorted(run.glob("checkpoint_*"))
    return found[-1] if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="out/vae_bench", help="corpus, shards, checkpoints and logs go here")
    ap.add_argument("--res", default="256,512", help="training resolutions, in order")
    ap.add_argument("--steps", default="2000,1000", help="optimizer steps per resolution")
    ap.add_argument("--token-budget", default="400000,300000", help="input voxels per step per resolution")
    ap.add_argument("--lr", default="2e-4,1e-4", help="peak learning rate per resolution")
    ap.add_argument("--size", default="paper")
    ap.add_argument("--holdout", type=float, default=0.1, help="share of the meshes kept out of training")
    ap.add_argument("--points", type=int, default=100_000, help="surface samples per mesh for the metrics")
    ap.add_argument("--use-gpu", default="true", choices=["true", "false"])
    ap.add_argument("--json", default="", help="also write the table's rows here")
    ap.add_argument("--stages", type=int, default=0,
                    help="train at most this many new stages, then stop (the next run with the same --work goes on)")
    a = ap.parse_args()
    res = per_list(a.res, len(a.res.split(",")), int)
    steps = per_list(a.steps, len(res), int)
    budget = per_list(a.token_budget, len(res), int)
    lrs = per_list(a.lr, len(res), float)
    work = Path(a.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    s2 = [sys.executable, "-m", "pipeline.cli"]

    t0 = time.time()
    shards = work / "shards"
    if not (shards / "manifest.parquet").exists():
        run(s2 + ["corpus", str(work / "corpus")], work / "corpus.log")
        run(s2 + ["preprocess", "--input", str(work / "corpus"), "--output", str(shards),
                  "--resolutions", ",".join(map(str, res)), "--views", "0", "--no-progress"], work / "preprocess.log")
    prep_s = time.time() - t0

    rows, prev, prev_res, trained = [], "", 0, 0
    for r, n, b, lr in zip(res, steps, budget, lrs):
        run_dir = work / "runs" / f"vae{r}"
        cmd = [sys.executable, "-m", "pipeline.train", "vae", "--shards", str(shards), "--resolution", str(r),
               "--model", a.size, "--steps", str(n), "--token-budget", str(b), "--lr", str(lr),
               "--warmup-steps", str(min(100, n // 10)), "--holdout", str(a.holdout), "--eval-points", str(a.points),
               "--use-gpu", a.use_gpu, "--storage", str(work / "runs"), "--name", f"vae{r}",
               "--checkpoint-every", str(max(1, n // 4)), "--report-every", "10"]
        if prev:
            cmd += ["--init-from", prev]
        ckpt = last_checkpoint(run_dir)
        if ckpt is not None and (ckpt / "eval.json").exists():
            print(f"{run_dir}: finished earlier, reusing its evaluation and weights", flush=True)
        elif a.stages and trained >= a.stages:
            print(f"stopping before the {r}³ stage (--stages {a.stages}); rerun with --work {work} to go on", flush=True)
            break
        else:
            run(cmd, work / f"train{r}.log")
            trained += 1
            ckpt = last_checkpoint(run_dir)
        evaluation = json.loads((ckpt / "eval.json").read_text())
        reports = [json.loads(line) for line in (work / f"train{r}.log").read_text().splitlines()
                   if line.startswith('{"step"')] if (work / f"train{r}.log").exists() else []
        history = json.loads((ckpt / "history.json").read_text())
        # the baseline of a stage that starts from the previous stage is that stage's weights
        start = f"{prev_res}³ weights, before this stage" if prev else "untrained"
        prev, prev_res = str(run_dir), r
        for label, key in ((start, "before"), ("trained", "after")):
            row = {"res": r, "network": label, **{c: evaluation[key][c] for c in COLUMNS},
                   "no_surface": evaluation[key].get("no_surface", 0)}
            if key == "after":
                tok = history["tokens_per_s"][1:] or history["tokens_per_s"]
                row.update({"steps": len(history["step"]), "tokens_per_s": sum(tok) / max(1, len(tok)),
                            "peak_gpu_gib": reports[-1].get("peak_memory_gb") if reports else None,
                            "heldout_shapes": len(evaluation["shapes"])})
            rows.append(row)

    print(f"\nSS-VAE ({a.size}) on the sample corpus; shards in {prep_s:.0f} s; held-out share: {a.holdout}")
    print("| res | weights | steps | voxels/s | peak GiB | Chamfer | F1@0.005 | F1@0.001 | normal cons. |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        tps, peak = row.get("tokens_per_s"), row.get("peak_gpu_gib")
        tps_s = f"{tps:.0f}" if tps else ""
        peak_s = f"{peak:.1f}" if peak is not None else ""
        print(f"| {row['res']} | {row['network']} | {row.get('steps', '')} | {tps_s} | {peak_s} | "
              f"{row['chamfer']:.5f} | {row['f1@0.005']:.4f} | {row['f1@0.001']:.4f} | {row['normal_consistency']:.4f} |"
              + (f" ({row['no_surface']} without a surface)" if row["no_surface"] else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
