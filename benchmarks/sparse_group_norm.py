"""SparseGroupNorm forward + backward against its previous formulation, in one process, alternated.

    python benchmarks/sparse_group_norm.py                  # CPU, one thread: OMP_NUM_THREADS=1
    python benchmarks/sparse_group_norm.py --device cuda

The previous formulation (kept here as the baseline) reduced each shape's rows and each group's channels in
one ``mean(dim=(0, 2))`` and formed the centred rows twice; the layer now sums over the rows first (one
output per channel), then over the group's channels, and centres once. Both accumulate in float64. Prints
the median of the alternated repeats and the largest output and gradient differences.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.sparse import SparseTensor  # noqa: E402
from model.sparse.layers import SparseGroupNorm, _norm_dtype  # noqa: E402


def previous(norm: SparseGroupNorm, x: SparseTensor) -> torch.Tensor:
    f = _norm_dtype(x.feats).reshape(len(x), norm.num_groups, -1)
    parts = []
    for rows in x.layout:
        part = f[rows]
        m = part.mean(dim=(0, 2), dtype=torch.float64)
        var = (part - m.to(part.dtype)[None, :, None]).square().mean(dim=(0, 2), dtype=torch.float64)
        inv = torch.rsqrt(var.to(f.dtype) + norm.eps)
        parts.append((part - m.to(f.dtype)[None, :, None]) * inv[None, :, None])
    out = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(len(x), -1)
    return (out * norm.weight + norm.bias).to(x.dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="60000x64,100000x256,200000x128,30000x512",
                    help="rows x channels (32 groups, two shapes of half the rows each)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    print(f"# {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"threads {torch.get_num_threads()}; torch {torch.__version__}")
    print("| rows | channels | previous ms | layer ms | speed-up | max output diff | max grad diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    torch.manual_seed(0)
    for case in args.cases.split(","):
        n, c = (int(v) for v in case.split("x"))
        cells = torch.randperm(64 ** 3)[:n]
        coords = torch.stack([cells // 4096, cells // 64 % 64, cells % 64], 1).to(device)
        feats = torch.randn(n, c, device=device, requires_grad=True)
        x = SparseTensor.packed(coords, feats, torch.tensor([0, n // 2, n], device=device), 64)
        norm = SparseGroupNorm(32, c).to(device)
        times, results = {"previous": [], "layer": []}, {}
        for _ in range(args.repeats):
            for name, fn in (("previous", lambda: previous(norm, x)), ("layer", lambda: norm(x).feats)):
                feats.grad = None
                sync()
                t0 = time.perf_counter()
                y = fn()
                y.square().sum().backward()
                sync()
                times[name].append(time.perf_counter() - t0)
                results[name] = (y.detach(), feats.grad.clone())
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        dy = (results["previous"][0] - results["layer"][0]).abs().max().item()
        dg = (results["previous"][1] - results["layer"][1]).abs().max().item()
        print(f"| {n:,} | {c} | {med['previous']:.1f} | {med['layer']:.1f} | {med['previous'] / med['layer']:.2f}× "
              f"| {dy:.1e} | {dg:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
