"""SS-VAE training on the sample corpus at 256³ then 512³: the paper's reconstruction columns.

Writes the sample corpus, preprocesses it into shards (Ray Data, local cluster) at the given
resolutions without condition views, trains the VAE one resolution after the other (each stage
starting from the previous one's weights, as the paper's curriculum does), and prints the
held-out reconstruction table (Chamfer, F1@0.005, F1@0.001, normal consistency) of every stage
beside the same network untrained, which is the baseline measured in the same run.

    python benchmarks/vae_train.py --work /tmp/vaerun --res 256,512 --minutes 4,3 --batch 2,1

Each stage is one ``s2 train-vae-local`` process, so the commands it prints can be rerun alone.
Rerunning with the same ``--work`` reuses the shards and every stage that finished (its
``metrics.json`` and ``vae.pt`` exist): a run cut short by a time limit goes on where it stopped.
Delete a stage's folder to train it again.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="out/vae_bench", help="corpus, shards, checkpoints and logs go here")
    ap.add_argument("--res", default="256,512", help="training resolutions, in order")
    ap.add_argument("--minutes", default="4,3", help="training time per resolution")
    ap.add_argument("--batch", default="2,1", help="shapes per step per resolution")
    ap.add_argument("--lr", default="2e-4,1e-4", help="peak learning rate per resolution")
    ap.add_argument("--size", default="paper")
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--points", type=int, default=100_000, help="surface samples per mesh for the metrics")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default="", help="also write the table's rows here")
    ap.add_argument("--stages", type=int, default=0,
                    help="train at most this many new stages, then stop (the next run with the same --work goes on)")
    a = ap.parse_args()
    res = per_list(a.res, len(a.res.split(",")), int)
    minutes = per_list(a.minutes, len(res), float)
    batch = per_list(a.batch, len(res), int)
    lrs = per_list(a.lr, len(res), float)
    work = Path(a.work)
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
    for r, m, b, lr in zip(res, minutes, batch, lrs):
        out = work / f"vae{r}"
        cmd = s2 + ["train-vae-local", "--shards", str(shards), "--resolution", str(r), "--size", a.size,
                    "--steps", "1000000", "--time-limit-s", str(m * 60), "--batch-size", str(b), "--lr", str(lr),
                    "--holdout", str(a.holdout), "--eval-points", str(a.points), "--device", a.device,
                    "--dtype", a.dtype, "--out-dir", str(out), "--log-every", "50", "--no-progress"]
        if prev:
            cmd += ["--init-from", prev]
        if (out / "metrics.json").exists() and (out / "vae.pt").exists():
            print(f"{out}: finished earlier, reusing its metrics and weights", flush=True)
        elif a.stages and trained >= a.stages:
            print(f"stopping before the {r}³ stage (--stages {a.stages}); rerun with --work {work} to go on", flush=True)
            break
        else:
            run(cmd, work / f"train{r}.log")
            trained += 1
        metrics = json.loads((out / "metrics.json").read_text())
        # the baseline of a stage that starts from the previous stage is that stage's weights
        start = f"{prev_res}³ weights, before this stage" if prev else "untrained"
        prev, prev_res = str(out / "vae.pt"), r
        for label, key in ((start, "before"), ("trained", "after")):
            row = {"res": r, "network": label,
                   **{c: metrics[key][c] for c in COLUMNS}, "no_surface": metrics[key].get("no_surface", 0)}
            if key == "after":
                row.update({k: metrics[k] for k in ("steps", "train_seconds", "first_step_seconds",
                                                    "steps_per_second_after_first", "input_voxels_per_second",
                                                    "peak_gpu_gib", "device", "train_samples", "heldout_samples")})
            rows.append(row)

    print(f"\nSS-VAE ({a.size}) on the sample corpus; shards in {prep_s:.0f} s; held-out meshes: {a.holdout}")
    print("| res | weights | steps | s/step | peak GiB | Chamfer | F1@0.005 | F1@0.001 | normal cons. |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        sps, peak = row.get("steps_per_second_after_first"), row.get("peak_gpu_gib")
        step_s = f"{1 / sps:.3f}" if sps else ""
        peak_s = f"{peak:.1f}" if peak is not None else ""
        print(f"| {row['res']} | {row['network']} | {row.get('steps', '')} | {step_s} | {peak_s} | "
              f"{row['chamfer']:.5f} | {row['f1@0.005']:.4f} | {row['f1@0.001']:.4f} | {row['normal_consistency']:.4f} |"
              + (f" ({row['no_surface']} without a surface)" if row["no_surface"] else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
