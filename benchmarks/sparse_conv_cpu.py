"""Sparse convolution on a CPU: the blocked gather–GEMM path against the per-offset reference.

Two tables, one thread (the demo's training workers run one each):
- one 3×3×3 submanifold conv on sphere shells (band ±2 voxels) at the given grids and channel widths,
  forward and forward + backward (both gradients), median of ``--repeats``;
- one training step (forward, backward) of an SS-VAE (``--vae``, default the demo's ``debug_r4``) on a batch
  of shells, with its every conv on each path, and on the gather–GEMM path with bfloat16 GEMM operands
  (``gather_gemm.GEMM_DTYPE``, ``--cpu-conv-precision bf16``; fast only on CPUs with AMX, which the table names).

Both paths compute the same sums; the largest relative difference of the outputs (the step: of all gradients)
is printed beside each row.

    python benchmarks/sparse_conv_cpu.py --res 64 128 --channels 16 32 64 128
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from kernels.sparse_conv import build_kernel_map, sparse_conv
from model.sdf_shapes import AnalyticShape, narrow_band


def shell(res: int, radius: float = 0.7, center=(0.0, 0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    coords, values = narrow_band(AnalyticShape("sphere", (radius,)), res, 2.0)
    shift = torch.tensor([round(c * res / 2) for c in center], dtype=coords.dtype)
    return (coords + shift).clamp(0, res - 1), values


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def conv_rows(res_list, channels, repeats):
    rows = []
    for res in res_list:
        coords, _ = shell(res)
        c4 = torch.cat([torch.zeros_like(coords[:, :1]), coords], 1)
        kmap = build_kernel_map(c4, c4, res, 3, in_sorted=True)
        for ch in channels:
            g = torch.Generator().manual_seed(res + ch)
            x = torch.randn(len(c4), ch, generator=g)
            w = torch.randn(27, ch, ch, generator=g) / (27 * ch) ** 0.5
            dy = torch.randn(len(c4), ch, generator=g)
            out = {}
            for backend in ("torch", "gemm"):
                xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()

                def fwd():
                    with torch.no_grad():
                        return sparse_conv(x, w, kmap, backend=backend)

                def both():
                    torch.autograd.grad(sparse_conv(xs, ws, kmap, backend=backend), (xs, ws), dy)

                out[backend] = (median_s(fwd, repeats), median_s(both, repeats), fwd())
            diff = float((out["gemm"][2] - out["torch"][2]).abs().max() / out["torch"][2].abs().max())
            rows.append((f"{res}³", len(c4), ch, out["torch"][0], out["gemm"][0], out["torch"][1], out["gemm"][1], diff))
    return rows


def vae_rows(vae_name: str, res: int, repeats: int):
    import model.sparse.layers as layers
    from model.sparse.tensor import SparseTensor
    from model.vae import VAE_SIZES, SparseSDFVAE

    parts = [shell(res, r, c) for r, c in ((0.6, (0, 0, 0)), (0.4, (0.1, -0.1, 0.0)))]
    x = SparseTensor.from_samples([p[0] for p in parts], [p[1][:, None] for p in parts], res)
    torch.manual_seed(0)
    vae = SparseSDFVAE(VAE_SIZES[vae_name])
    with torch.no_grad():  # the released layout's zero output layers would leave every other gradient zero
        for q in vae.parameters():
            if q.dim() > 1 and not q.any():
                q.normal_(std=0.02)
    from kernels.sparse_conv import gather_gemm

    original, original_dtype = layers.sparse_conv, gather_gemm.GEMM_DTYPE
    out = {}
    try:
        for name, backend, dtype in (("torch", "torch", None), ("gemm", "gemm", None), ("bf16", "gemm", torch.bfloat16)):
            layers.sparse_conv = functools.partial(original, backend=backend)
            gather_gemm.GEMM_DTYPE = dtype

            def step():
                torch.manual_seed(1)
                y, mean, _ = vae(x)
                (y.feats.square().mean() + mean.square().mean()).backward()

            seconds = median_s(step, repeats)
            vae.zero_grad()
            step()
            out[name] = (seconds, torch.cat([q.grad.flatten() for q in vae.parameters() if q.grad is not None]))
            vae.zero_grad()
    finally:
        layers.sparse_conv, gather_gemm.GEMM_DTYPE = original, original_dtype

    def diff(name):
        return float((out[name][1] - out["torch"][1]).abs().max() / out["torch"][1].abs().max())

    return [(vae_name, f"{res}³", x.feats.shape[0], out["torch"][0], out["gemm"][0], out["bf16"][0], diff("gemm"),
             diff("bf16"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--res", type=int, nargs="+", default=[64, 128])
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--vae", default="debug_r4", help="SS-VAE size for the step table ('' skips it)")
    p.add_argument("--vae-res", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    print(f"one 3×3×3 submanifold conv, {args.threads} thread(s), median of {args.repeats} (ms)")
    print(f"{'grid':>6} {'voxels':>8} {'C':>4} | {'fwd ref':>8} {'fwd gemm':>8} {'×':>5} | "
          f"{'f+b ref':>8} {'f+b gemm':>8} {'×':>5} | max rel diff")
    for grid, n, ch, fr, fg, br, bg, diff in conv_rows(args.res, args.channels, args.repeats):
        print(f"{grid:>6} {n:>8,} {ch:>4} | {fr * 1e3:8.1f} {fg * 1e3:8.1f} {fr / fg:5.2f} | "
              f"{br * 1e3:8.1f} {bg * 1e3:8.1f} {br / bg:5.2f} | {diff:.1e}")
    if args.vae:
        from kernels.sparse_conv.gather_gemm import cpu_bf16_gemm

        print(f"\nSS-VAE training step (forward + backward), {args.threads} thread(s), median of {args.repeats} (s); "
              f"bf16: gather-GEMM with bfloat16 operands (this CPU's bfloat16 GEMM instructions: {cpu_bf16_gemm() or 'none'})")
        print(f"{'network':>10} {'grid':>6} {'voxels':>8} | {'ref':>7} {'gemm':>7} {'×':>5} | {'bf16':>7} {'× gemm':>6} | "
              f"max rel diff of the gradients, gemm / bf16")
        for name, grid, n, tr, tg, tb, dg, db in vae_rows(args.vae, args.vae_res, args.repeats):
            print(f"{name:>10} {grid:>6} {n:>8,} | {tr:7.3f} {tg:7.3f} {tr / tg:5.2f} | {tb:7.3f} {tg / tb:6.2f} | "
                  f"{dg:.1e} / {db:.1e}")


if __name__ == "__main__":
    main()
