"""The released refiners' cost on one GPU: one 192³ patch and a whole 512³ run, by precision and layout.

    python benchmarks/refiner.py                       # paper-size sdf and sign refiners, random weights
    python benchmarks/refiner.py --kinds sdf --skip-run
    python benchmarks/refiner.py --size debug          # CPU smoke run (debug configs, tiny patches)
    python benchmarks/refiner.py --convs               # each narrow 3³ conv: cuDNN against kernels/conv3d

Both refiners run a dense 3D UNet (134.7 M parameters) over 27 overlapping 192³ patches of a 512³ grid:
about 6.5 (sdf) / 6.2 (sign) TFLOP a patch by PyTorch's FLOP counter, ~175 TFLOP a shape. Rows, each in
the same process on the same inputs, the first the baseline the others are divided by:

- ``fp32``: weights in float32 (cuDNN's TF32 for the convolutions, PyTorch's default), the smoothing by
  27 slice-multiply-adds a pass (``kernels.smooth`` reference): what the cascade ran before;
- ``fp16, reference norm``: convolutions and linears in float16 (``VoxelRefiner.cast_weights``, the
  release's precision), each GroupNorm + SiLU by PyTorch on a float32 copy (``kernels.group_norm``
  reference), smoothing by the Triton kernel: what the cascade ran before the group-norm kernel;
- ``fp16, cuDNN narrow convs``: the same with GroupNorm + SiLU by the Triton kernel (float32 statistics),
  every convolution in cuDNN (``model.refiner.SMALL_CONVS`` off): what it ran before kernels/conv3d;
- ``fp16, per-tap narrow convs``: the same with the 3³ convolutions of at most 8 input channels in
  kernels/conv3d's per-tap kernel (``PACKED_MAX_CIN`` 0): what it ran before the packed kernel;
- ``fp16``: the same with those convolutions in the packed (implicit-GEMM) kernel: what it runs now;
- ``fp16, channels-last``: the same with the module and its input in ``torch.channels_last_3d``;
- ``fp16, reference smoothing``: isolates the smoothing kernel's share (sdf refiner only).

Also the smoothing alone (one 192³ × 8 patch, three passes) and, unless ``--skip-run``, ``run()`` on a
sphere shell's band at 512³ (the cascade's call: 27 patches, blending, straddling voxels), fp32 against fp16.
Reported: median ms (``triton.testing.do_bench`` on CUDA, wall clock on the CPU), effective TFLOP/s,
× faster than the fp32 row, the largest difference from the fp32 output, peak GPU memory.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.conv3d import triton_kernel as tk  # noqa: E402
from kernels.group_norm import group_norm_act  # noqa: E402
from kernels.smooth import adaptive_smooth  # noqa: E402
from model import refiner as rf  # noqa: E402


def timed(fn, cuda: bool, rep_ms: int) -> float:
    if cuda:
        import triton
        return triton.testing.do_bench(fn, warmup=3, rep=rep_ms, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def patch_flops(cfg: rf.RefinerConfig) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        m = rf.VoxelRefiner(cfg)
        p = cfg.patch_size
        x = torch.ones(1, 1, p, p, p)
        f = torch.ones(1, cfg.width, p, p, p) if cfg.kind == "sdf" else None
        with FlopCounterMode(display=False) as fc:
            m(x, f) if f is not None else m(x)
    return fc.get_total_flops()


def random_refiner(cfg: rf.RefinerConfig, device: str) -> rf.VoxelRefiner:
    torch.manual_seed(0)
    net = rf.VoxelRefiner(cfg).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            fan = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape) / fan ** 0.5 + (1.0 if p.ndim == 1 and "norm" in name else 0.0))
    return net.to(device)


def variant(base: rf.VoxelRefiner, name: str) -> rf.VoxelRefiner:
    import copy
    net = copy.deepcopy(base)
    if name.startswith("fp16"):
        net.cast_weights(torch.float16)
    if "channels-last" in name:
        net.to(memory_format=torch.channels_last_3d)
    return net


def shell_band(res: int, device: str, radius_frac: float = 0.4, width: float = 2.0):
    """Voxels within ``width`` of a sphere of radius ``radius_frac``·res at the grid's centre, their SDF in
    voxels clipped to ±1 (a decoded band's values) and random decoder features."""
    r = torch.arange(res, device=device, dtype=torch.float32) - (res - 1) / 2
    coords, vals = [], []
    for z0 in range(0, res, 64):  # slabs, to bound the dense temporaries
        z = r[z0:z0 + 64]
        d = (z[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).sqrt() - radius_frac * res
        idx = (d.abs() < width).nonzero()
        vals.append((d[idx[:, 0], idx[:, 1], idx[:, 2]] / width).clamp(-1, 1))
        idx[:, 0] += z0
        coords.append(idx)
    coords, vals = torch.cat(coords), torch.cat(vals)
    feats = torch.randn(len(coords), 32, device=device, generator=torch.Generator(device).manual_seed(1))
    return coords, vals, feats


def _conv_flops(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if isinstance(m, torch.nn.Conv3d):
        return 2.0 * y.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] * m.kernel_size[2]
    if isinstance(m, torch.nn.ConvTranspose3d):
        return 2.0 * x.numel() * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * m.kernel_size[2]
    if isinstance(m, torch.nn.Linear):
        return 2.0 * y.numel() * m.in_features
    return 0.0


def layer_profile(kind: str, size: str, dev: str, cuda: bool, reps: int = 5) -> None:
    """Every leaf module of one fp16 patch forward, timed by events (CUDA) or the wall clock (CPU), summed
    over ``reps`` forwards after a warm-up, grouped by (module type, channels in -> out, spatial size)."""
    name = ("paper" if kind == "sdf" else "paper_1024") if size == "paper" else ("debug" if kind == "sdf" else "debug_1024")
    cfg = rf.RefinerConfig.named(name)
    net = variant(random_refiner(cfg, dev), "fp16")
    ps = cfg.patch_size
    g = torch.Generator(dev).manual_seed(2)
    x = (torch.rand(1, 1, ps, ps, ps, device=dev, generator=g) * 2 - 1).half()
    f = torch.randn(1, cfg.width, ps, ps, ps, device=dev, generator=g).half() if kind == "sdf" else None
    stats: dict = {}
    marks: list = []

    def pre(m, inp):
        ev = torch.cuda.Event(enable_timing=True) if cuda else None
        if cuda:
            ev.record()
        marks.append((ev, time.perf_counter()))

    def post(m, inp, out):
        ev0, t0 = marks.pop()
        x0 = inp[0] if inp else out
        key = (type(m).__name__, tuple(x0.shape[1:2]) + tuple(out.shape[1:2]), tuple(out.shape[2:]),
               tuple(getattr(m, "kernel_size", ())))
        if cuda:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record()
            pending.append((key, ev0, ev1, _conv_flops(m, x0, out)))
        else:
            pending.append((key, None, (time.perf_counter() - t0) * 1e3, _conv_flops(m, x0, out)))

    pending: list = []
    leaves = [m for m in net.modules() if not list(m.children())]
    hooks = [h for m in leaves for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    total = 0.0
    with torch.no_grad():
        for r in range(reps + 1):
            pending.clear()
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            net(x, f) if f is not None else net(x)
            if cuda:
                torch.cuda.synchronize()
            if r == 0:
                continue
            total += (time.perf_counter() - t) * 1e3
            for key, e0, e1, fl in pending:
                ms = e0.elapsed_time(e1) if cuda else e1
                s = stats.setdefault(key, [0.0, 0.0, 0])
                s[0] += ms
                s[1] += fl
                s[2] += 1
    for h in hooks:
        h.remove()
    leaf_ms = sum(s[0] for s in stats.values()) / reps
    print(f"\n## {kind} refiner, one {ps}³ fp16 patch: {total / reps:.1f} ms a forward, "
          f"{leaf_ms:.1f} ms inside leaf modules (the rest: activations, adds, smoothing, upsampling)")
    print("| module | channels in→out | output size | kernel | calls | ms | share | effective TFLOP/s |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for key, (ms, fl, n) in sorted(stats.items(), key=lambda kv: -kv[1][0]):
        ms, fl, n = ms / reps, fl / reps, n // reps
        if ms < 0.005 * leaf_ms:
            continue
        ch = "→".join(str(c) for c in key[1])
        tf = f"{fl / ms / 1e9:.1f}" if fl else "–"
        print(f"| {key[0]} | {ch} | {'×'.join(map(str, key[2]))} | {'×'.join(map(str, key[3])) or '–'} | {n} | "
              f"{ms:.1f} | {ms / (total / reps):.0%} | {tf} |")


def conv_table(dev: str, cuda: bool, rep_ms: int) -> None:
    """Each distinct narrow 3³ convolution of the paper sdf and sign refiners (<= 64 in, <= 32 out channels) on
    one float16 patch-sized input: cuDNN with its heuristic's algorithm, cuDNN autotuned (``cudnn.benchmark``),
    and kernels/conv3d per tap and, for <= 8 input channels, packed (implicit GEMM over (tap, channel) chunks)
    at two block sizes; ms, effective TFLOP/s and the largest difference from cuDNN."""
    import torch.nn.functional as F
    from kernels.conv3d.triton_kernel import conv3d_3x3_triton
    shapes = {}  # (C_in, C_out, side) -> [calls, has bias]

    def count(mod, inputs, _out):
        entry = shapes.setdefault((mod.in_channels, mod.out_channels, inputs[0].shape[2]), [0, mod.bias is not None])
        entry[0] += 1

    for name in ("paper", "paper_1024"):
        cfg = rf.RefinerConfig.named(name)
        with torch.device("meta"):
            m = rf.VoxelRefiner(cfg)
        hooks = [mod.register_forward_hook(count) for mod in m.modules()
                 if isinstance(mod, rf.Conv3x3) and mod.in_channels <= 64 and mod.out_channels <= 32]
        p = cfg.patch_size
        with torch.device("meta"):
            m(torch.ones(1, 1, p, p, p), torch.ones(1, cfg.width, p, p, p) if cfg.kind == "sdf" else None)
        for h in hooks:
            h.remove()
    g = torch.Generator(dev).manual_seed(5)
    print("\n| C_in → C_out at side³ | calls (both refiners) | variant | ms | effective TFLOP/s | × cuDNN heuristics | "
          "max diff |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    prev = torch.backends.cudnn.benchmark
    for (cin, cout, side), (calls, has_bias) in sorted(shapes.items(), key=lambda kv: (-kv[0][2], kv[0])):
        x = torch.randn(1, cin, side, side, side, device=dev, generator=g).half()
        w = (torch.randn(cout, cin, 3, 3, 3, device=dev, generator=g) / (27 * cin) ** 0.5).half()
        b = torch.randn(cout, device=dev, generator=g).half() if has_bias else None
        flop = 2 * cin * cout * 27 * side ** 3
        variants = [("cuDNN heuristics", False, None), ("cuDNN autotune", True, None)]
        if cuda:
            variants += [(f"Triton per tap, {blk} voxels a program", False, (blk, False, 32)) for blk in (128, 256)]
            if cin <= 8:  # the implicit GEMM over (tap, channel) chunks
                variants += [(f"Triton packed, {blk} voxels, chunks of {kc}", False, (blk, True, kc))
                             for blk in (128, 256) for kc in (16, 32)]
        ref = base = None
        for vname, tune, blk in variants:
            torch.backends.cudnn.benchmark = tune
            fn = (lambda: F.conv3d(x, w, b, padding=1)) if blk is None else \
                (lambda o=blk: conv3d_3x3_triton(x, w, b, block=o[0], packed=o[1], kc=o[2]))
            try:
                out = fn().float()
                ms = timed(fn, cuda, rep_ms)
            finally:
                torch.backends.cudnn.benchmark = prev
            ref = out if ref is None else ref
            base = ms if base is None else base
            print(f"| {cin} → {cout} at {side}³ | {calls} | {vname} | {ms:.3f} | {flop / ms / 1e9:.1f} | "
                  f"{base / ms:.2f} | {float((out - ref).abs().max()):.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="paper", choices=["paper", "debug"])
    p.add_argument("--kinds", default="sdf,sign")
    p.add_argument("--skip-run", action="store_true", help="patches and smoothing only, no whole run()")
    p.add_argument("--rep-ms", type=int, default=2000)
    p.add_argument("--radius", type=float, default=0.4, help="run(): the sphere's radius as a fraction of "
                   "the grid (0.4 at 512: the centre patch is empty; 0.2: the 8 corners)")
    p.add_argument("--convs", action="store_true",
                   help="only the narrow 3³ convolutions of a patch: cuDNN (heuristic, autotuned) against kernels/conv3d")
    p.add_argument("--layers", action="store_true",
                   help="only a per-layer profile of one fp16 patch of each kind (CUDA events around every leaf)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# {card}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')} UTC; cudnn.allow_tf32 "
          f"{torch.backends.cudnn.allow_tf32}; size {args.size}")
    if args.convs:
        conv_table(dev, cuda, args.rep_ms)
        return
    if args.layers:
        for kind in args.kinds.split(","):
            layer_profile(kind, args.size, dev, cuda)
        return
    rows = []
    for kind in args.kinds.split(","):
        name = ("paper" if kind == "sdf" else "paper_1024") if args.size == "paper" else \
            ("debug" if kind == "sdf" else "debug_1024")
        cfg = rf.RefinerConfig.named(name)
        flop = patch_flops(cfg)
        base = random_refiner(cfg, dev)
        ps = cfg.patch_size
        g = torch.Generator(dev).manual_seed(2)
        x = torch.rand(1, 1, ps, ps, ps, device=dev, generator=g) * 2 - 1
        f = torch.randn(1, cfg.width, ps, ps, ps, device=dev, generator=g) if kind == "sdf" else None
        names = ["fp32", "fp16, reference norm", "fp16, cuDNN narrow convs", "fp16, per-tap narrow convs", "fp16",
                 "fp16, channels-last"] + \
            (["fp16, reference smoothing"] if kind == "sdf" else [])
        ref = None
        for vname in names:
            net = variant(base, vname)
            dt = net.dtype
            xi, fi = x.to(dt), (f.to(dt) if f is not None else None)
            if "channels-last" in vname:
                xi = xi.contiguous(memory_format=torch.channels_last_3d)
                fi = fi.contiguous(memory_format=torch.channels_last_3d) if fi is not None else None
            backend = "torch" if (vname == "fp32" or "reference" in vname) else "auto"
            norm_backend = "torch" if (vname == "fp32" or "reference norm" in vname) else "auto"
            orig, orig_norm = rf.adaptive_smooth, rf.group_norm_act
            rf.adaptive_smooth = lambda a, w, times=3, _b=backend: adaptive_smooth(a, w, times, backend=_b)
            rf.group_norm_act = functools.partial(group_norm_act, backend=norm_backend)
            orig_small, rf.SMALL_CONVS = rf.SMALL_CONVS, "cuDNN narrow" not in vname
            orig_packed, tk.PACKED_MAX_CIN = tk.PACKED_MAX_CIN, 0 if "per-tap" in vname else tk.PACKED_MAX_CIN
            try:
                with torch.no_grad():
                    out = (net(xi, fi) if fi is not None else net(xi)).float()
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    ms = timed(lambda: net(xi, fi) if fi is not None else net(xi), cuda, args.rep_ms)
            finally:
                rf.adaptive_smooth, rf.group_norm_act, rf.SMALL_CONVS = orig, orig_norm, orig_small
                tk.PACKED_MAX_CIN = orig_packed
            ref = out if ref is None else ref
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
            rows.append(dict(what=f"{kind} refiner, one {ps}³ patch", variant=vname, ms=ms,
                             tflops=flop / ms / 1e9, diff=float((out - ref).abs().max()), peak=peak))
            del net
        if kind == "sdf":  # the smoothing alone: three passes over one patch of width channels
            xs = torch.randn(1, cfg.width, ps, ps, ps, device=dev, generator=g)
            ws = torch.randn(1, 27, ps, ps, ps, device=dev, generator=g)
            want = adaptive_smooth(xs, ws, backend="torch")
            for b in (["torch", "triton"] if cuda else ["torch"]):
                ms = timed(lambda: adaptive_smooth(xs, ws, backend=b), cuda, max(200, args.rep_ms // 10))
                got = adaptive_smooth(xs, ws, backend=b)
                rows.append(dict(what=f"smoothing alone, 3 passes, {cfg.width}×{ps}³", variant=b, ms=ms,
                                 tflops=float("nan"), diff=float((got - want).abs().max()), peak=float("nan")))
        if not args.skip_run:
            res = cfg.res * (2 if kind == "sign" else 1)
            coords, vals, feats = shell_band(res, dev, radius_frac=args.radius)
            ref = None
            runs = (("fp32", True), ("fp16, every patch", False), ("fp16, cuDNN narrow convs", True), ("fp16", True))
            for vname, reuse in runs:
                net = variant(base, vname.split(",")[0])
                orig_small, rf.SMALL_CONVS = rf.SMALL_CONVS, "cuDNN narrow" not in vname
                empty = sum(len(r) == 0 for r in net._patch_rows(
                    coords if kind == "sdf" else rf.mean_pool_2(coords, vals)[0], cfg.stride))
                call = (lambda: net.run(coords, vals, feats, reuse_empty=reuse)) if kind == "sdf" else \
                    (lambda: net.run(coords, vals, reuse_empty=reuse))
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                try:
                    out = call()
                    if cuda:
                        torch.cuda.synchronize()
                finally:
                    rf.SMALL_CONVS = orig_small
                ms = (time.perf_counter() - t) * 1e3
                n = len(out[0])
                ref = n if ref is None else ref
                peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
                rows.append(dict(what=f"{kind} refiner run(), sphere band at {res}³ ({len(coords):,} voxels, "
                                      f"{empty} of 27 patches empty)",
                                 variant=vname, ms=ms, tflops=(27 - empty + (empty > 0) if reuse else 27) * flop / ms / 1e9,
                                 diff=float(n - ref), peak=peak))
                del net
    print("\n| what | variant | ms | effective TFLOP/s | × faster than the first row | max diff from it | peak GiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    first = {}
    for r in rows:
        base_ms = first.setdefault(r["what"], r["ms"])
        print(f"| {r['what']} | {r['variant']} | {r['ms']:.1f} | {r['tflops']:.1f} | {base_ms / r['ms']:.2f} | "
              f"{r['diff']:.2e} | {r['peak']:.2f} |")
    print("\n(for run() rows, 'max diff' is the difference in the count of straddling voxels)")


if __name__ == "__main__":
    main()
