"""SparseGroupNorm (+ SiLU) by shape segments: the Triton kernel against the PyTorch path, in one process.

    python benchmarks/sparse_group_norm.py --device cuda
    python benchmarks/sparse_group_norm.py --device cuda --dtype bfloat16 --cases 21408x64,91632x64

The PyTorch path (``segment_group_norm_act_reference``: float64 sums, ten or more kernels a norm) is the
baseline; the kernel (kernels/group_norm/segments.py) is three kernels forward and three backward with
Chan-merged float32 statistics. Each case is two shapes of half the rows each (a guided batch), 32 groups,
the norm followed by SiLU as in the SSA compressors and the SS-VAE's blocks. Forward alone (inference) and
forward + backward (training), alternated, median of the repeats, with the largest output and gradient
differences. On the CPU only the PyTorch path runs (the kernel needs CUDA or the interpreter).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.group_norm import segment_group_norm_act  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--cases", default="21408x64,91632x64,1446x64,100000x256,30000x512",
                    help="rows x channels (the 512 / 1024 stages' compressor norms at 10,704 / 45,816 tokens x2, "
                         "their coarse grid, SS-VAE blocks)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    backends = ("torch", "triton") if device.type == "cuda" else ("torch",)
    print(f"# {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; {args.dtype}; "
          f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| rows | channels | PyTorch fwd ms | kernel fwd ms | fwd speed-up | PyTorch fwd+bwd ms | kernel fwd+bwd ms "
          "| fwd+bwd speed-up | max output diff | max dx diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    torch.manual_seed(0)
    for case in args.cases.split(","):
        n, c = (int(v) for v in case.split("x"))
        offsets = (0, n // 2, n)
        x = (torch.randn(n, c, device=device) * 2 + 1).to(dtype).requires_grad_()
        w = torch.randn(c, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(c, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(n, c, device=device, dtype=dtype)
        times = {(k, m): [] for k in backends for m in ("fwd", "bwd")}
        results = {}
        for _ in range(args.repeats + 2):
            for be in backends:
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    segment_group_norm_act(x, offsets, 32, w, b, silu=True, backend=be)
                sync()
                t1 = time.perf_counter()
                y = segment_group_norm_act(x, offsets, 32, w, b, silu=True, backend=be)
                (dx,) = torch.autograd.grad(y, [x], dy)
                sync()
                t2 = time.perf_counter()
                times[be, "fwd"].append(t1 - t0)
                times[be, "bwd"].append(t2 - t1)
                results[be] = (y.detach().float(), dx.float())
        med = {k: sorted(v[2:])[len(v[2:]) // 2] * 1e3 for k, v in times.items()}
        if len(backends) == 1:
            print(f"| {n:,} | {c} | {med['torch', 'fwd']:.3f} | – | – | {med['torch', 'bwd']:.3f} | – | – | – | – |")
            continue
        dyo = (results["torch"][0] - results["triton"][0]).abs().max().item()
        dgx = (results["torch"][1] - results["triton"][1]).abs().max().item()
        print(f"| {n:,} | {c} | {med['torch', 'fwd']:.3f} | {med['triton', 'fwd']:.3f} | "
              f"{med['torch', 'fwd'] / med['triton', 'fwd']:.2f}× | {med['torch', 'bwd']:.3f} | "
              f"{med['triton', 'bwd']:.3f} | {med['torch', 'bwd'] / med['triton', 'bwd']:.2f}× | {dyo:.1e} | {dgx:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
