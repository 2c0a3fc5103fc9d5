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

_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from torch.overrides import TorchFunctionMode
    sys.path.insert(0, "tests")
    from sign_cases import CASES
    from pipeline.geometry.sdf import prepare_mesh, sdf_on_grid

    IS_CUDA = torch._C.TensorBase.__dict__["is_cuda"]

    class CudaBranches(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__self__", None) is IS_CUDA:
                return True
            return func(*args, **(kwargs or {}))

    res, band = 40, 2.0
    for name in ("inverted_closed", "scan_with_holes", "overlapping_convex_pieces"):
        v, f = CASES[name]()
        cpu = sdf_on_grid(prepare_mesh(v, f), res, band)
        for chunk in (1 << 27, 1 << 12):
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


def test_cuda_code_path_in_interpreter_equals_cpu_path():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
