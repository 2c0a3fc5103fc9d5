"""The CUDA code path of the sparse SDF, run on the CPU, equals the CPU path.

Inside a torch function mode every tensor's `is_cuda` reads True, so each branch the GPU takes runs
here on CPU tensors (sorts, compactions, packed halves), and the band's Triton kernels run in
Triton's interpreter; the band's chunking and the line budget are the CUDA ones (one chunk) and a
small chunk (many). CPU and GPU distances are exact to float32 rounding by different formulas, so
the bands may differ only at their edge and the values by 1e-4 voxel; signs are the same.
"""

import os
import subprocess
import sys
import textwrap

_MODE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from torch.overrides import TorchFunctionMode
    sys.path.insert(0, "tests")

    IS_CUDA = torch._C.TensorBase.__dict__["is_cuda"]

    class CudaBranches(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__self__", None) is IS_CUDA:
                return True
            return func(*args, **(kwargs or {}))
    """
)

_SCRIPT = _MODE + textwrap.dedent(
    """
    from sign_cases import CASES
    from pipeline.geometry.sdf import prepare_mesh, sdf_on_grid

    res, band = 40, 2.0
    for name in ("inverted_closed", "scan_with_holes", "overlapping_convex_pieces"):
        v, f = CASES[name]()
        cpu = sdf_on_grid(prepare_mesh(v, f), res, band)
        for chunk in (1 << 27, 1 << 12) if name == "inverted_closed" else (1 << 27,):
            with CudaBranches():
                gpu = sdf_on_grid(prepare_mesh(v, f), res, band, chunk=chunk)
            kc, kg = ((s.coords.long() * torch.tensor([res * res, res, 1])).sum(1).numpy() for s in (cpu, gpu))
            assert (np.diff(kg) > 0).all() and gpu.coords.dtype == torch.int32
            both, ic, ig = np.intersect1d(kc, kg, return_indices=True)
            assert len(both) > 0.99 * max(len(kc), len(kg)), (name, len(kc), len(kg))
            for s, keys in ((cpu, kc), (gpu, kg)):  # only voxels at the band's edge may be in one band alone
                alone = ~np.isin(keys, both)
                assert (np.abs(s.values.numpy()[alone]) > 1 - 1e-4 / band).all(), name
            dc, dg = cpu.values[ic] * band, gpu.values[ig] * band  # in voxel widths
            assert float((dc.abs() - dg.abs()).abs().max()) < 1e-4, name
            assert bool(((dc < 0) == (dg < 0)).all()), name
    print("ok")
    """
)


# The band's Triton scan (tables, row spans, column slabs, candidates) against brute force on the soups
# of test_band (edges along grid axes and diagonals, slivers, big triangles), and against the PyTorch
# scan of the same GPU path (distance_backend "torch"): the same keys and distances.
_BAND = _MODE + textwrap.dedent(
    """
    from test_band import BAND, H, RES, _brute, _soups
    from pipeline.geometry.band import band_pairs

    for name, soup in _soups().items():
        exact = _brute(soup)
        tri = torch.as_tensor(soup, dtype=torch.float32)
        for chunk in (1 << 27, 300):
            with CudaBranches():
                bp = band_pairs(tri, RES, BAND, chunk=chunk, distance_backend="triton")
                ref = band_pairs(tri, RES, BAND, chunk=chunk, distance_backend="torch")
                lines = band_pairs(tri, RES, BAND, chunk=chunk, distance_backend="triton", closest=False)
            keys = bp.keys.long()
            got = torch.zeros(RES ** 3, dtype=torch.bool)
            got[keys] = True
            edge = (exact - BAND).abs() < 1e-4
            assert int(((got != (exact < BAND)) & ~edge).sum()) == 0, name
            assert float((bp.d2.double().sqrt() / H - exact[keys]).abs().max()) < 1e-4, name
            assert torch.equal(bp.keys, ref.keys) and torch.equal(bp.tri, ref.tri), name
            torch.testing.assert_close(bp.d2, ref.d2, rtol=1e-6, atol=0.0)
            assert torch.equal(lines.keys, bp.keys) and torch.equal(lines.d2, bp.d2), name
    print("ok")
    """
)


# The grid-line crossings of the Triton kernels (kernels.distance.lines) against LineCrossings' PyTorch
# code: the same crossings, keys and counts, on the whole grid and on a box of lines; and a region.
_LINES = _MODE + textwrap.dedent(
    """
    from sign_cases import CASES
    from pipeline.geometry.winding import LineCrossings

    res = 48
    for name in ("nested_shells", "overlapping_convex_pieces"):
        v, f = CASES[name]()
        t = torch.as_tensor(v, dtype=torch.float64)[torch.as_tensor(f)]
        ijk = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
        for box in (None, ((3, 5), (res - 7, res - 2))):
            ref = LineCrossings(t, res, box)
            with CudaBranches():
                got = LineCrossings(t, res, box)
                w = got(ijk)
            assert torch.equal(got.keys[got.keys < 1 << 62], ref.keys) and torch.equal(w, ref(ijk)), name
            assert int(w.abs().max()) >= 1, name
    # A region (the slabs of a memory budget) is the whole band cut to its box on this path too.
    from pipeline.geometry.sdf import prepare_mesh, sdf_on_grid
    with CudaBranches():
        prep = prepare_mesh(*CASES["overlapping_convex_pieces"]())
        whole = sdf_on_grid(prep, res)
        lo, hi = (10, 8, 12), (30, 40, 33)
        part = sdf_on_grid(prep, res, region=(lo, hi))
    keep = ((whole.coords >= torch.tensor(lo)) & (whole.coords < torch.tensor(hi))).all(1)
    assert torch.equal(part.coords, whole.coords[keep]) and torch.equal(part.values, whole.values[keep])
    print("ok")
    """
)


def _run(script: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_cuda_code_path_in_interpreter_equals_cpu_path():
    _run(_SCRIPT)


def test_cuda_band_scan_in_interpreter_is_exact():
    _run(_BAND)


def test_cuda_line_crossings_in_interpreter_equal_pytorch():
    _run(_LINES)
