"""Sparse 3×3×3 submanifold conv: Triton vs plain PyTorch gather–GEMM–scatter vs dense cuDNN conv3d.

Structure: a sphere shell (band ±2 voxels) at 256³ / 512³. Times are medians
of triton.testing.do_bench (CUDA events). Prints a table; with --json writes
all numbers. Correctness (Triton vs the float32 reference on the same voxels)
is checked and printed first.

    python benchmarks/sparse_conv.py --res 256 512 --channels 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from kernels.sparse_conv import build_kernel_map, sparse_conv_reference, sparse_conv_triton


def sphere_shell(res: int, band: float = 2.0, radius: float = 0.75) -> torch.Tensor:
    """(N, 4) int32 [0, i, j, k] voxels within ``band`` voxels of a sphere, sorted by key, built block-wise on the GPU."""
    from model.sdf_shapes import AnalyticShape, narrow_band

    coords, _ = narrow_band(AnalyticShape("sphere", (radius,)), res, band)
    return torch.cat([torch.zeros_like(coords[:, :1]), coords], 1).cuda()


def bench(fn, warmup=10, rep=50):
    from triton.testing import do_bench

    torch.cuda.synchronize()
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def run_size(res: int, c: int, dtype: torch.dtype, dense: bool, reference: bool) -> dict:
    coords = sphere_shell(res)
    n = coords.shape[0]
    x = torch.randn(n, c, device="cuda", dtype=dtype)
    w = (torch.randn(27, c, c, device="cuda") / math.sqrt(27 * c)).to(dtype)
    dy = torch.randn(n, c, device="cuda", dtype=dtype)
    row = {"res": res, "voxels": n, "channels": c, "dtype": str(dtype).replace("torch.", "")}
    build = lambda: build_kernel_map(coords, coords, res, 3, in_sorted=True)  # noqa: E731
    row["map_ms"] = bench(build, 3, 20)  # Triton binary searches, one launch
    row["map_torch_ms"] = bench(lambda: build_kernel_map(coords, coords, res, 3, in_sorted=True, backend="torch"), 3, 20)
    kmap = build()
    if not torch.equal(kmap.neighbors, build_kernel_map(coords, coords, res, 3, in_sorted=True, backend="torch").neighbors):
        raise SystemExit(f"kernel maps differ at {res}³")
    kmap.inverse  # submanifold: the flipped map, built once with the structure
    # correctness on this structure: Triton (half) against the float32 reference
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    ref = sparse_conv_reference(xr, wr, kmap)
    ref.backward(dy.float())
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = sparse_conv_triton(xt, wt, kmap)
    out.backward(dy)
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    row["err_fwd"], row["err_dx"], row["err_dw"] = rel(out, ref), rel(xt.grad, xr.grad), rel(wt.grad, wr.grad)
    del xr, wr, ref, xt, wt, out

    def fwd():
        return sparse_conv_triton(x, w, kmap)

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def fwd_bwd():
        xg.grad = wg.grad = None
        sparse_conv_triton(xg, wg, kmap).backward(dy)

    row["triton_fwd_ms"] = bench(fwd)
    row["triton_fwdbwd_ms"] = bench(fwd_bwd)
    row["triton_fwd_mib"] = peak_mib(fwd)
    row["triton_fwdbwd_mib"] = peak_mib(fwd_bwd)
    row["tflops_fwd"] = 2 * int((kmap.neighbors >= 0).sum()) * c * c / row["triton_fwd_ms"] / 1e9
    if reference:
        def rfwd():
            return sparse_conv_reference(x, w, kmap)

        def rfwd_bwd():
            xg.grad = wg.grad = None
            sparse_conv_reference(xg, wg, kmap).backward(dy)

        row["torch_fwd_ms"] = bench(rfwd, 3, 20)
        row["torch_fwdbwd_ms"] = bench(rfwd_bwd, 3, 20)
        row["torch_fwdbwd_mib"] = peak_mib(rfwd_bwd)
    spconv_row(row, coords, x, w, dy, res, c, kmap)
    if dense:
        try:
            grid = torch.zeros(1, c, res, res, res, device="cuda", dtype=dtype)
            grid[0][:, coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()] = x.T
            wd = w.reshape(3, 3, 3, c, c).permute(4, 3, 0, 1, 2).contiguous()
            torch.backends.cudnn.benchmark = True
            row["dense_fwd_ms"] = bench(lambda: F.conv3d(grid, wd, padding=1), 3, 20)
            row["dense_fwd_mib"] = peak_mib(lambda: F.conv3d(grid, wd, padding=1)) + grid.numel() * grid.element_size() / 2 ** 20
            del grid
        except torch.OutOfMemoryError:
            row["dense_fwd_ms"] = float("nan")
        torch.cuda.empty_cache()
    return row


def spconv_row(row: dict, coords, x, w, dy, res: int, c: int, kmap) -> None:
    """spconv 2.x SubMConv3d on the same voxels, features and weights, where spconv is installed.

    ``spconv_map_fwd_ms`` builds its index pairs inside the call (a fresh SparseConvTensor each time), as our
    ``map_ms`` + ``triton_fwd_ms`` does; ``spconv_fwd_ms`` / ``spconv_fwdbwd_ms`` reuse the pairs."""
    try:
        import spconv.pytorch as spconv
    except ImportError:
        return
    conv = spconv.SubMConv3d(c, c, 3, bias=False, indice_key="bench").to("cuda", x.dtype)
    with torch.no_grad():  # spconv's weight layout: (Cout, k, k, k, Cin); ours (k³, Cin, Cout) in (i, j, k) order
        conv.weight.copy_(w.reshape(3, 3, 3, c, c).permute(4, 0, 1, 2, 3))
    idx = coords.int().contiguous()

    def fresh(feats):
        return spconv.SparseConvTensor(feats, idx, [res] * 3, 1)

    y = conv(fresh(x)).features
    # spconv returns rows in its input order, which is ours
    row["err_spconv_vs_triton"] = float((y.float() - sparse_conv_triton(x, w, kmap).float()).norm()
                                        / sparse_conv_triton(x, w, kmap).float().norm())
    row["spconv_map_fwd_ms"] = bench(lambda: conv(fresh(x)), 3, 20)
    t = fresh(x)
    conv(t)  # pairs cached in t under the indice key

    def sfwd():
        return conv(t.replace_feature(x))

    xg = x.clone().requires_grad_()

    def sfwd_bwd():
        xg.grad = None
        conv.weight.grad = None
        conv(t.replace_feature(xg)).features.backward(dy)

    row["spconv_fwd_ms"] = bench(sfwd)
    row["spconv_fwdbwd_ms"] = bench(sfwd_bwd)
    row["spconv_fwdbwd_mib"] = peak_mib(sfwd_bwd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--res", type=int, nargs="+", default=[256, 512])
    p.add_argument("--channels", type=int, nargs="+", default=[64])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--json", default="")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/sparse_conv.py needs a CUDA device")
    dtype = getattr(torch, a.dtype)
    rows = []
    for res in a.res:
        for c in a.channels:
            rows.append(run_size(res, c, dtype, not a.no_dense, not a.no_reference))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{torch.cuda.get_device_name()}  triton {__import__('triton').__version__}  torch {torch.__version__}")
    cols = ["res", "voxels", "channels", "map_ms", "map_torch_ms", "triton_fwd_ms", "triton_fwdbwd_ms", "torch_fwd_ms", "torch_fwdbwd_ms",
            "spconv_map_fwd_ms", "spconv_fwd_ms", "spconv_fwdbwd_ms", "dense_fwd_ms", "triton_fwdbwd_mib", "spconv_fwdbwd_mib", "torch_fwdbwd_mib", "tflops_fwd", "err_fwd", "err_dx", "err_dw", "err_spconv_vs_triton"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for k in cols))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
