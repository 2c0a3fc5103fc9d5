"""SS-DiT training step: tokens/s per GPU, step time and peak memory per GPU at 512³ / 1024³ token counts.

The paper-size SS-DiT (24 blocks, width 1024, 32/2 heads, d = 32), rectified-flow loss, gradient
checkpointing, on one synthetic shell-shaped shape of the given token count per GPU with 1,374
condition tokens (DINOv2 ViT-L/14-reg at 518²). Full attention and SSA are timed in the same run.

Two engines:
- ``--engine torch``: one process, torch AdamW, bf16 autocast (no DeepSpeed).
- ``--engine deepspeed --zero 2|3``: the training loop's own DeepSpeed engine (``pipeline.train.engine``:
  bf16 weights, fp32 master weights and AdamW states partitioned by ZeRO, EMA of the weights), one
  process per GPU, launched by torchrun without Ray:

    python benchmarks/train_dit.py --tokens 10700,46000 --attention full,ssa --steps 5
    torchrun --nproc_per_node 2 benchmarks/train_dit.py --engine deepspeed --zero 2 --json z2x2.json
    python benchmarks/train_dit.py --summary z2x1.json z2x2.json   # scaling table from saved runs
    python benchmarks/train_dit.py --tokens 46000 --attention ssa --profile 3   # where the step goes, by kind

Every rank trains its own shape (data parallel); the step time is the slowest rank's median, peak memory
the largest rank's, and scaling efficiency = tokens/s per GPU at N GPUs / tokens/s per GPU at 1 GPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torch.distributed as dist

from model.dit import DiTConfig, SparseDiT
from model.sparse import SparseTensor
from model.flow import TimestepSampler
from pipeline.train.tasks import FlowObjective

COND_TOKENS = 1374
FUSED_ADAMW = True  # --foreach-adamw: torch's multi-tensor AdamW in both engines (the baseline)


def shell_coords(n: int, grid: int, seed: int = 0) -> torch.Tensor:
    """n distinct latent voxels on a thick sphere shell in a grid³ (a surface-like token set)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(grid)
    c = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    d = (c.float() - (grid - 1) / 2).norm(dim=1)
    order = torch.argsort((d - 0.38 * grid).abs())
    pool = c[order[: min(len(order), int(n * 1.3))]]
    return pool[torch.randperm(len(pool), generator=g)[:n]]


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _torch_step(model, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=FUSED_ADAMW, foreach=not FUSED_ADAMW)

    def step(x0, cond):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(x0, cond)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, [opt]


def _deepspeed_step(model, zero: int):
    from pipeline.train.config import TrainConfig
    from pipeline.train.engine import EMA, make_engine

    cfg = TrainConfig(zero_stage=zero, use_gpu=True, precision="bf16", lr=1e-4, grad_clip=1.0)
    engine, opt, sched = make_engine(model, cfg, fused=FUSED_ADAMW)
    ema = EMA(engine.module, cfg.ema_decay)

    def step(x0, cond):
        loss, _ = engine(x0.replace(x0.feats.bfloat16()), cond.bfloat16())
        engine.backward(loss)
        engine.step()
        ema.update()
        return loss

    return step, [engine, opt, sched, ema]


def bench(cfg_name: str, tokens: int, attention: str, steps: int, warmup: int, ckpt: bool, engine: str,
          zero: int, device, profile: int = 0, peak_tflops: float = 989.0, profile_ops: bool = False) -> dict:
    rank, world = _world()
    cfg = DiTConfig.named(cfg_name, attention=attention, grad_checkpointing=ckpt)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = FlowObjective(SparseDiT(cfg), TimestepSampler(shift=6.0)).to(device)
    params = sum(p.numel() for p in model.parameters())
    step, keep = _torch_step(model, device) if engine == "torch" else _deepspeed_step(model, zero)
    grid = 64 if tokens <= 30000 else 128  # latent grid of 512³ / 1024³
    coords = shell_coords(tokens, grid, seed=rank).to(device)  # each rank its own shape
    gen = torch.Generator(device=device).manual_seed(rank)
    x0 = SparseTensor.packed(coords, torch.randn(tokens, cfg.in_channels, device=device, generator=gen),
                             torch.tensor([0, tokens], device=device), grid)
    cond = torch.randn(1, COND_TOKENS, cfg.cond_dim, device=device, generator=gen)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = step(x0, cond)
        torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    mine = torch.tensor([sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated(device) / 2**30,
                         float(loss)], device=device, dtype=torch.float64)
    if world > 1:  # slowest rank's step, largest rank's memory, mean loss
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        allv = torch.stack(parts)
        mine = torch.stack([allv[:, 0].max(), allv[:, 1].max(), allv[:, 2].mean()])
    step_s, peak, loss_v = mine.tolist()
    breakdown = None
    if profile:
        from step_profile import print_breakdown, print_ops, profile_step  # beside this script

        cats, kernels, wall_ms = profile_step(lambda: step(x0, cond), profile, device)
        breakdown = {"categories_ms": cats, "wall_ms": wall_ms}
        if rank == 0:
            print_breakdown(cats, kernels, wall_ms, title=f"{cfg_name}, {attention}, {tokens} tokens, "
                                                          f"{engine}{'' if engine == 'torch' else f' ZeRO-{zero}'}")
        if profile_ops:  # a second pass: recording input shapes adds host time to the first pass's gaps
            ops = {}
            profile_step(lambda: step(x0, cond), profile, device, ops=ops)
            if rank == 0:
                print_ops(ops)
    del step, keep, model
    gc.collect()
    torch.cuda.empty_cache()
    # model FLOPs by the usual 6 * parameters * tokens (attention's own FLOPs not counted)
    mfu = 6 * params * tokens / step_s / (peak_tflops * 1e12)
    return {"config": cfg_name, "engine": engine, "zero": zero if engine == "deepspeed" else None, "gpus": world,
            "attention": attention, "tokens": tokens, "step_s": step_s, "tokens_per_s_per_gpu": tokens / step_s,
            "mfu": mfu, "breakdown": breakdown,
            "peak_gb": peak, "loss": loss_v, "params_m": params / 1e6, "grad_checkpointing": ckpt,
            "device": torch.cuda.get_device_name(device)}


def _row(r: dict) -> str:
    eng = "torch" if r["engine"] == "torch" else f"ZeRO-{r['zero']}"
    head = f"| {eng} | {r['gpus']} | {r['attention']} | {r['tokens']} |"
    if "error" in r:
        return f"{head} {r['error']} | | | | |"
    return (f"{head} {r['step_s']:.3f} | {r['tokens_per_s_per_gpu']:.0f} | {100 * r.get('mfu', float('nan')):.0f}% | "
            f"{r['peak_gb']:.1f} | {r.get('efficiency', float('nan')):.2f} |")


def print_table(rows: list[dict]) -> None:
    """Scaling efficiency against the 1-GPU row of the same engine, ZeRO stage, attention and tokens."""
    base = {(r["engine"], r["zero"], r["attention"], r["tokens"]): r["tokens_per_s_per_gpu"]
            for r in rows if r["gpus"] == 1 and "error" not in r}
    for r in rows:
        b = base.get((r["engine"], r["zero"], r["attention"], r["tokens"]))
        if b and "error" not in r:
            r["efficiency"] = r["tokens_per_s_per_gpu"] / b
    dev = next((r["device"] for r in rows if "device" in r), "")
    print(f"\n({dev}, {rows[0]['config'] if rows else ''}; efficiency = tokens/s per GPU against 1 GPU; "
          "MFU = 6 x parameters x tokens / step / bf16 peak)")
    print("| engine | GPUs | attention | tokens | step (s) | tokens/s per GPU | MFU | peak GiB per GPU | efficiency |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(rows, key=lambda r: (r["engine"], r["zero"] or 0, r["tokens"], r["attention"], r["gpus"])):
        print(_row(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="paper")
    ap.add_argument("--tokens", default="10700,46000")
    ap.add_argument("--attention", default="full,ssa")
    ap.add_argument("--skip", default="", help="comma-separated attention:tokens pairs not to run (e.g. full:100000)")
    ap.add_argument("--engine", choices=["torch", "deepspeed"], default="torch")
    ap.add_argument("--zero", type=int, default=2, help="DeepSpeed ZeRO stage (--engine deepspeed)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--profile", type=int, default=0,
                    help="after timing, profile this many steps and print where the step goes (benchmarks/step_profile.py)")
    ap.add_argument("--keep-attention", action="store_true",
                    help="keep the SSA layers' attention outputs for the backward "
                         "(model.dit.CHECKPOINT_KEEPS_ATTENTION)")
    ap.add_argument("--unfused-norms", action="store_true",
                    help="the DiT blocks' LayerNorm32 + modulate instead of kernels/norm_modulate (the baseline)")
    ap.add_argument("--unfused-head-norms", action="store_true",
                    help="the cross-attention q/k norms through the PyTorch reference in training (before the "
                         "kernels/head_rms_norm backward)")
    ap.add_argument("--unfused-residuals", action="store_true",
                    help="the gated residuals as addcmul over per-token gates (model.dit.FUSED_RESIDUALS off; "
                         "the baseline of the segment kernel)")
    ap.add_argument("--group-norm-torch", action="store_true",
                    help="the SSA compressors' GroupNorm in PyTorch (model.sparse.layers.GROUP_NORM_BACKEND "
                         "'torch'; the baseline of kernels/group_norm by segments)")
    ap.add_argument("--no-selection-reuse", action="store_true",
                    help="the checkpoint recomputation selects its SSA blocks again (the baseline of the reuse)")
    ap.add_argument("--foreach-adamw", action="store_true",
                    help="torch's multi-tensor AdamW instead of its one-kernel one (the trainer's engine before "
                         "it took fused=True)")
    ap.add_argument("--profile-ops", action="store_true",
                    help="with --profile: a second profiled pass printing device time by op and input shapes")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the card's dense bf16 peak for the MFU column (H100/H200 SXM: 989)")
    ap.add_argument("--json", default="")
    ap.add_argument("--summary", nargs="*", help="print one scaling table from saved --json files and exit")
    args = ap.parse_args()
    import model.dit as dit_module
    global FUSED_ADAMW
    FUSED_ADAMW = not args.foreach_adamw
    if args.no_selection_reuse:
        import contextlib
        dit_module.selection_reuse = lambda: (contextlib.nullcontext(), contextlib.nullcontext())
    if args.unfused_norms:
        dit_module.FUSED_NORMS = False
    if args.keep_attention:
        dit_module.CHECKPOINT_KEEPS_ATTENTION = True
    if args.unfused_residuals:
        dit_module.FUSED_RESIDUALS = False
    if args.group_norm_torch:
        import model.sparse.layers as layers_module
        layers_module.GROUP_NORM_BACKEND = "torch"
    if args.unfused_head_norms:
        import kernels.head_rms_norm as hrn
        import model.dense_dit as dense_module
        fused = hrn.head_rms_norm

        def reference_when_training(x, gamma, backend="auto"):
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or gamma.requires_grad)
            return fused(x, gamma, backend="torch" if needs_grad else backend)
        dense_module.head_rms_norm = reference_when_training
    if args.summary:
        rows = [r for path in args.summary for r in json.load(open(path))]
        print_table(rows)
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/train_dit.py needs a CUDA device")
    if "WORLD_SIZE" in os.environ:  # torchrun: one process per GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    elif args.engine == "deepspeed":  # one GPU without a launcher: a group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl", rank=0, world_size=1)
    if dist.is_initialized() and args.engine == "torch" and dist.get_world_size() > 1:
        raise SystemExit("--engine torch runs one process; use --engine deepspeed across GPUs")
    rank, _ = _world()
    device = torch.device("cuda", torch.cuda.current_device())
    skip = set(args.skip.split(",")) - {""}
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for attention in args.attention.split(","):
            if f"{attention}:{tokens}" in skip:
                continue
            try:
                row = bench(args.config, tokens, attention, args.steps, args.warmup, not args.no_checkpointing,
                            args.engine, args.zero, device, args.profile, args.peak_tflops,
                            args.profile_ops)
            except Exception as e:  # one failing configuration (OOM, a kernel) must not hide the others
                row = {"config": args.config, "engine": args.engine, "zero": args.zero, "gpus": _world()[1],
                       "attention": attention, "tokens": tokens, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        print_table(rows)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
