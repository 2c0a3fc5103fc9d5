"""SS-DiT training step: tokens/s, step time and peak memory per GPU at 512³ / 1024³ token counts.

Runs one process per GPU without Ray (the GPU hosts of the benchmark have PyTorch alone): the paper-size
SS-DiT (24 blocks, width 1024, 32/2 heads, d = 32), rectified-flow loss, AdamW, bf16 autocast, gradient
checkpointing, on one synthetic shell-shaped shape of the given token count with 1,374 condition tokens
(DINOv2 ViT-L/14-reg at 518²). Full attention and SSA are timed in the same run.

    python benchmarks/train_dit.py --tokens 10700,46000 --attention full,ssa --steps 5
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from model.dit import DiTConfig, SparseDiT
from model.flow import TimestepSampler
from pipeline.train.tasks import FlowObjective


def shell_coords(n: int, grid: int, seed: int = 0) -> torch.Tensor:
    """n distinct latent voxels on a thick sphere shell in a grid³ (a surface-like token set)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(grid)
    c = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    d = (c.float() - (grid - 1) / 2).norm(dim=1)
    order = torch.argsort((d - 0.38 * grid).abs())
    pool = c[order[: min(len(order), int(n * 1.3))]]
    return pool[torch.randperm(len(pool), generator=g)[:n]]


def bench(cfg_name: str, tokens: int, attention: str, steps: int, warmup: int, ckpt: bool, device) -> dict:
    cfg = DiTConfig.named(cfg_name, attention=attention, grad_checkpointing=ckpt)
    torch.manual_seed(0)
    model = FlowObjective(SparseDiT(cfg), TimestepSampler(shift=6.0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    grid = 64 if tokens <= 30000 else 128  # latent grid of 512³ / 1024³
    coords = shell_coords(tokens, grid).to(device)
    x0 = torch.randn(tokens, cfg.in_channels, device=device)
    cu = torch.tensor([0, tokens], device=device)
    cond = torch.randn(1, 1374, cfg.cond_dim, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(x0, coords, cu, cond)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    params = sum(p.numel() for p in model.parameters())
    return {"config": cfg_name, "attention": attention, "tokens": tokens, "step_s": step,
            "tokens_per_s": tokens / step, "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "loss": float(loss), "params_m": params / 1e6, "grad_checkpointing": ckpt,
            "device": torch.cuda.get_device_name(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="paper")
    ap.add_argument("--tokens", default="10700,46000")
    ap.add_argument("--attention", default="full,ssa")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/train_dit.py needs a CUDA device")
    device = torch.device("cuda")
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for attention in args.attention.split(","):
            try:
                row = bench(args.config, tokens, attention, args.steps, args.warmup, not args.no_checkpointing, device)
            except Exception as e:  # one failing configuration (OOM, a kernel) must not hide the others
                row = {"config": args.config, "attention": attention, "tokens": tokens, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n| attention | tokens | step (s) | tokens/s | peak GiB |  ({rows[0].get('device', '')}, {args.config})")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['attention']} | {r['tokens']} | {r['error']} | | |")
        else:
            print(f"| {r['attention']} | {r['tokens']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_gb']:.1f} |")


if __name__ == "__main__":
    main()
