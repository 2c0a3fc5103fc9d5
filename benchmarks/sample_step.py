"""One sampling step of the SS-DiT as generation runs it, timed and broken down by kind of work.

    python benchmarks/sample_step.py                          # paper SS-DiT, 10,704 and 45,816 tokens, CUDA
    python benchmarks/sample_step.py --tokens 45816 --profile 3
    python benchmarks/sample_step.py --config debug --device cpu --tokens 500 --steps 2   # a CPU smoke run
    python benchmarks/sample_step.py --structure --fused-norms --graph   # the structure DiT's step instead

A step is what ``model/cascade.py`` ``_guided`` does at each Euler step: one no-grad forward over the
shape's tokens twice (the condition and the zero condition, classifier-free guidance as one batch of two
shapes), in the network's dtype (bf16 on CUDA). The tokens are a sphere shell of the generation stage's
count (``train_dit.shell_coords``), the condition 1,374 DINOv2-sized tokens (or packed ones with
``sparse_conditions``). Prints the median step, the effective TFLOP/s by 2·params·tokens (the linears'
count, attention not included), and with ``--profile N`` where the step goes (``step_profile.py``):
the sampling stages are most of a generated mesh (benchmarks/RESULTS.md, "Generation"). The weights are
random; the parameters the released init sets to zero (gates, modulation, output layer) get small random
values, else every block is an identity and the velocity zero. ``--fused-norms`` times the step without
``kernels/norm_modulate`` and ``kernels/head_rms_norm`` as the row and with them beside it, and prints how
far the two velocities are apart. ``--structure`` times the structure stage's step instead: the dense DiT
(``--config`` names a ``DENSE_DIT_CONFIGS`` entry) on its whole latent grid, guided as a batch of two.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import print_breakdown, print_ops, profile_step  # noqa: E402
from train_dit import COND_TOKENS, shell_coords  # noqa: E402

from model.cascade import guidance_batch  # noqa: E402
from model.graphs import CapturedVelocity  # noqa: E402
from model.dense_dit import DenseDiT, DenseDiTConfig  # noqa: E402
from model.dit import DiTConfig, PackedCondition, SparseDiT  # noqa: E402
from model.sparse import SparseTensor  # noqa: E402


def guided_batch(cfg: DiTConfig, tokens: int, device, dtype, seed: int = 0):
    """(x, t, cond) of one guided step: the shell and its condition doubled as the cascade does
    (``model.cascade.guidance_batch``)."""
    grid = 64 if tokens <= 30000 else 128
    g = torch.Generator().manual_seed(seed)
    shape = SparseTensor.packed(shell_coords(tokens, grid, seed).to(device),
                                torch.randn(tokens, cfg.in_channels, generator=g).to(device, dtype),
                                torch.tensor([0, tokens], device=device), grid)
    n_cond = COND_TOKENS if cfg.width >= 256 else 20
    cond = torch.randn(1, n_cond, cfg.cond_dim, generator=g).to(device, dtype)
    if cfg.sparse_conditions:
        cc = torch.zeros(n_cond, 3, dtype=torch.int32)
        cc[:, 0], cc[:, 1] = torch.arange(n_cond) % 37, torch.arange(n_cond) // 37
        cond = PackedCondition(cond[0], cc.to(device), torch.tensor([0, n_cond], dtype=torch.int32, device=device))
    x, cond = guidance_batch(shape, cond)
    return x, torch.full((2,), 0.5, device=device, dtype=dtype), cond


def timed(fn, steps: int, warmup: int, sync) -> float:
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(cfg_name: str, tokens: int, steps: int, warmup: int, device, profile: int, sparse_conditions: bool,
            graph: bool = False, fused_norms: bool = False, profile_ops: bool = False, structure: bool = False):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if structure:  # the dense DiT on its whole grid: tokens are fixed by the config
        cfg = DenseDiTConfig.named(cfg_name)
        net, tokens = DenseDiT(cfg), cfg.tokens
    else:
        cfg = DiTConfig.named(cfg_name, sparse_conditions=sparse_conditions)
        net = SparseDiT(cfg)
    with torch.no_grad():  # the zero-initialised gates and output layer would make every block an identity and
        for p in net.parameters():  # the velocity zero: give them trained-like random values
            if not p.any():
                p.normal_(0.0, 0.02)
    net = net.to(device, dtype).eval()
    params = sum(p.numel() for p in net.parameters())
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if structure:
        g = torch.Generator().manual_seed(0)
        xd = torch.randn(2, cfg.in_channels, *(cfg.resolution,) * 3, generator=g).to(device, dtype)
        t = torch.full((2,), 0.5, device=device, dtype=dtype)
        cond = torch.randn(1, COND_TOKENS if cfg.width >= 256 else 20, cfg.cond_dim, generator=g).to(device, dtype)
        cond = torch.cat([cond, torch.zeros_like(cond)])  # the condition and the zero condition, one batch

        def velocity(feats, tt, _c=None):
            return net(feats, tt, cond)

        def step():
            with torch.no_grad():
                return velocity(xd, t)
    else:
        x, t, cond = guided_batch(cfg, tokens, device, dtype)

        def velocity(feats, tt, _c=None):
            return net(x.replace(feats), tt, cond).feats  # the sampler's x.replace: the structure stays cached

        def step():
            with torch.no_grad():
                return velocity(x.feats, t)

    import model.dense_dit as dense_dit_module
    import model.dit as dit_module
    # getattr: an older tree's modules (run with this script for an A/B) may lack a switch
    default_fused = (dit_module.FUSED_NORMS, dense_dit_module.FUSED_HEAD_NORMS,
                     getattr(dense_dit_module, "FUSED_NORMS", False))

    def set_fused(on):
        dit_module.FUSED_NORMS, dense_dit_module.FUSED_HEAD_NORMS, dense_dit_module.FUSED_NORMS = on

    if fused_norms:  # the baseline row is the unfused step; the fused one is timed below
        set_fused((False, False, False))
    s = timed(step, steps, warmup, sync)
    row = {"config": cfg_name, "network": "structure DiT" if structure else "SS-DiT",
           "sparse_conditions": sparse_conditions, "tokens": tokens, "batch_tokens": 2 * tokens,
           "step_ms": 1e3 * s, "tflops_linears": 2 * params * 2 * tokens / s / 1e12, "params_m": params / 1e6,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if fused_norms and device.type == "cuda":  # the same step with kernels/norm_modulate (model.dit.FUSED_NORMS)
        with torch.no_grad():
            eager_out = step().float()
            set_fused((True, True, True))
            try:
                fs = timed(step, steps, warmup, sync)
                fused_out = step().float()
            finally:
                set_fused(default_fused)
        row.update(fused_step_ms=1e3 * fs,
                   fused_rel_diff=((fused_out - eager_out).norm() / eager_out.norm()).item())
    set_fused(default_fused)
    if graph and device.type == "cuda":  # the same step replayed as a CUDA graph (model/graphs.py), same inputs
        captured = CapturedVelocity(velocity)
        inputs = xd if structure else x.feats
        with torch.no_grad():
            eager_out = step()
            graph_step = lambda: captured(inputs, t)  # noqa: E731
            gs = timed(graph_step, steps, warmup, sync)
            diff = (graph_step().float() - eager_out.float()).abs().max().item()
        row.update(graph_step_ms=1e3 * gs, graph_failed=captured.failed, graph_max_diff=diff)
    if profile:
        cats, kernels, wall = profile_step(step, profile, device)
        print_breakdown(cats, kernels, wall, title=f"{row['network']} {cfg_name}, {tokens} tokens x 2 (guidance), "
                                                   "one sampling step")
        if profile_ops:  # a second pass: recording input shapes adds host time to the first pass's gaps
            ops = {}
            profile_step(step, profile, device, ops=ops)
            print_ops(ops)
        row["categories_ms"] = cats
    return row


def set_switches(names: str, on: bool, ap) -> None:
    """Turn the named optional kernels on or off for an A/B in one tree."""
    import model.dit as dit_module
    import model.sparse.attention as attention_module
    import model.sparse.layers as layers_module
    for name in filter(None, names.split(",")):
        if name == "gelu":
            attention_module.FUSED_GELU = on
        elif name == "group-norm":
            layers_module.GROUP_NORM_BACKEND = "auto" if on else "torch"
        elif name == "residuals":
            dit_module.FUSED_RESIDUALS = on
        else:
            ap.error(f"unknown switch {name!r} (gelu, group-norm, residuals)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="paper")
    ap.add_argument("--tokens", default="10704,45816", help="tokens of a shape (512: 10,704; 1024: 45,816)")
    ap.add_argument("--sparse-conditions", action="store_true", help="packed image tokens (the released 512/1024)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", type=int, default=0, help="profile this many steps after timing")
    ap.add_argument("--profile-ops", action="store_true",
                    help="with --profile: a second profiled pass printing device time by op and input shapes")
    ap.add_argument("--graph", action="store_true", help="also time the step replayed as a CUDA graph")
    ap.add_argument("--fused-norms", action="store_true", help="also time the step with kernels/norm_modulate")
    ap.add_argument("--structure", action="store_true",
                    help="the structure DiT's step (dense, its whole grid; --tokens is ignored)")
    ap.add_argument("--on", default="", help="comma-separated switches to turn on: gelu (model.sparse.attention."
                    "FUSED_GELU), group-norm (kernels/group_norm by segments in SparseGroupNorm), residuals "
                    "(model.dit.FUSED_RESIDUALS)")
    ap.add_argument("--off", default="", help="comma-separated switches to turn off (the same names)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    set_switches(args.on, True, ap)
    set_switches(args.off, False, ap)
    sizes = ["0"] if args.structure else args.tokens.split(",")
    rows = [measure(args.config, int(n), args.steps, args.warmup, device, args.profile, args.sparse_conditions,
                    args.graph, args.fused_norms, args.profile_ops, args.structure)
            for n in sizes]
    print(f"{rows[0]['network']}, config {args.config}")
    print("| tokens (x2 guidance) | step ms | TFLOP/s (2·params·tokens) | CUDA graph step ms | eager / graph | device |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        g = r.get("graph_step_ms")
        gcol = "–" if g is None else (f"failed: {r['graph_failed']}" if r["graph_failed"] else
                                      f"{g:.1f} (max diff {r['graph_max_diff']:.1e})")
        ratio = f"{r['step_ms'] / g:.2f}×" if g and not r["graph_failed"] else "–"
        print(f"| {r['tokens']:,} | {r['step_ms']:.1f} | {r['tflops_linears']:.1f} | {gcol} | {ratio} | {r['device']} |")
    for r in rows:
        if "fused_step_ms" in r:
            print(f"fused norms, {r['tokens']:,} tokens: {r['fused_step_ms']:.1f} ms against {r['step_ms']:.1f} "
                  f"({r['step_ms'] / r['fused_step_ms']:.2f}×), velocity differs by {r['fused_rel_diff']:.1e} relative")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
