"""The SS-DiT's loss over N training steps, for the code under ``--root``: an A/B of two trees' curves.

    git archive OLD kernels model pipeline | tar -x -C /tmp/old
    python benchmarks/loss_curve.py --root /tmp/old --tag old &
    python benchmarks/loss_curve.py --root .        --tag new &
    wait

``benchmarks/train_dit.py``'s ``--engine torch`` step (torch AdamW at 1e-4, clip 1, bf16 autocast,
gradient checkpointing) on one synthetic shell of ``--tokens`` tokens and random condition tokens, with
fixed seeds, so two trees that compute the same training step give the same curve up to the order of
float sums. Prints the mean loss of every ``--window`` steps as it goes and writes every step's loss to
``$OUT/loss_<tag>.json`` (or ``--json``). Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="the tree whose kernels/, model/, pipeline/ are imported")
    ap.add_argument("--tag", default="tree")
    ap.add_argument("--config", default="paper")
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.root))  # before train_dit's imports: its model/ is the root's
    import torch
    from train_dit import _torch_step, shell_coords  # beside this script
    from model.dit import DiTConfig, SparseDiT
    from model.flow import TimestepSampler
    from model.sparse import SparseTensor
    from pipeline.train.tasks import FlowObjective

    if not torch.cuda.is_available():
        raise SystemExit("loss_curve.py needs a CUDA device")
    dev = torch.device("cuda")
    cfg = DiTConfig.named(args.config, attention="ssa", grad_checkpointing=True)
    torch.manual_seed(0)
    model = FlowObjective(SparseDiT(cfg), TimestepSampler(shift=6.0)).to(dev)
    step, _keep = _torch_step(model, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    coords = shell_coords(args.tokens, 64).to(dev)
    x0 = SparseTensor.packed(coords, torch.randn(args.tokens, cfg.in_channels, device=dev, generator=gen),
                             torch.tensor([0, args.tokens], device=dev), 64)
    cond = torch.randn(1, 1374, cfg.cond_dim, device=dev, generator=gen)
    torch.manual_seed(1)
    torch.cuda.manual_seed(1)
    losses, t0 = [], time.perf_counter()
    for i in range(args.steps):
        losses.append(step(x0, cond).detach())
        if (i + 1) % args.window == 0:
            mean = torch.stack(losses[-args.window:]).float().mean().item()
            print(f"{args.tag} step {i + 1}: mean loss of the last {args.window} {mean:.4f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    values = torch.stack(losses).float().cpu().tolist()
    out = args.json or os.path.join(os.environ.get("OUT", "."), f"loss_{args.tag}.json")
    with open(out, "w") as f:
        json.dump({"tag": args.tag, "root": args.root, "tokens": args.tokens, "losses": values}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
