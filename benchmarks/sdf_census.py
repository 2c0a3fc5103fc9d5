"""Census of the sparse SDF's CUDA code path, run on the CPU: how many kernels it launches and how often
the host waits for the device, by function and source line. A CPU census, not a GPU timing.

    python benchmarks/sdf_census.py --mesh scan_like --res 512
    python benchmarks/sdf_census.py --mesh .gpu/bunny.npz --res 1024 --open     # the winding path
    PYTHONPATH=<tree of another commit> python benchmarks/sdf_census.py ...     # that commit, same count

Inside a torch function mode every tensor's `is_cuda` reads True, so the GPU's branches run on CPU
tensors and the Triton kernels in Triton's interpreter (set here before Triton is imported). Budgets
that depend on free GPU memory are set to an 80 GB card's: the band in one chunk of up to 2^CHUNK
candidates, line and winding pieces of 2^27 and 2^26. "ops" counts torch calls and Triton launches made
from pipeline/ and kernels/ (views launch nothing but are counted: a proxy); "reads" counts calls that
wait for the device: .item()/int()/.tolist(), nonzero, unique, boolean indexing, repeat_interleave
without a size, torch.equal, .cpu(), and .to() (a no-op when the inputs are already on the GPU).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # read when triton.jit decorates: before anything imports Triton

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

_READS = {"item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__", "unique",
          "unique_consecutive", "masked_select", "cpu", "numpy", "_local_scalar_dense", "equal"}
_FREE = {"__get__", "__set__", "size", "dim", "numel", "shape", "dtype", "device", "stride", "__len__",
         "element_size", "is_floating_point", "data_ptr", "is_contiguous", "__hash__", "__repr__", "__format__",
         "ndim", "storage_offset", "untyped_storage", "_is_view", "is_complex"}
_IS_CUDA = torch._C.TensorBase.__dict__["is_cuda"]


class Census(TorchFunctionMode):
    """Counts ops and host reads per phase, by (file, function) and (file, line)."""

    def __init__(self):
        super().__init__()
        self.phase = "prep"
        self.totals = collections.Counter()
        self.ops = collections.Counter()
        self.reads = collections.Counter()
        self.in_kernel = 0

    def where(self):
        for fr in reversed(traceback.extract_stack()[:-2]):
            if "/pipeline/" in fr.filename or "/kernels/" in fr.filename:
                return fr
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is _IS_CUDA:
            return True
        name = getattr(func, "__name__", str(func))
        fr = None if self.in_kernel or name in _FREE else self.where()
        if fr is not None:
            self.totals[self.phase + " ops"] += 1
            self.ops[(Path(fr.filename).name, fr.name)] += 1
            if self._is_read(name, args, kwargs):
                self.totals[self.phase + " reads"] += 1
                self.reads[("/".join(fr.filename.split("/")[-3:]), fr.lineno, name)] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _is_read(name, args, kwargs) -> bool:
        if name in _READS:
            return True
        if name == "repeat_interleave":
            return kwargs.get("output_size") is None and not (len(args) > 1 and isinstance(args[1], int))
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)
        return name == "to" and any(str(a) == "cpu" for a in list(args[1:]) + list(kwargs.values()))

    def count_launches(self):
        """Triton launches in the interpreter count as one op each; the torch calls inside them none."""
        import triton.runtime.interpreter as interp

        run, census = interp.GridExecutor.__call__, self

        def launch(grid_self, *a, **k):
            fr = census.where()
            census.totals[census.phase + " ops"] += 1
            if fr is not None:
                census.ops[(Path(fr.filename).name, fr.name + " [triton]")] += 1
            census.in_kernel += 1
            try:
                return run(grid_self, *a, **k)
            finally:
                census.in_kernel -= 1

        interp.GridExecutor.__call__ = launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mesh", default="scan_like", help="as benchmarks/preprocess.py --mesh")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--open", action="store_true", help="cut the mesh open (winding-number sign path)")
    ap.add_argument("--chunk", type=int, default=27, help="band chunk of 2^CHUNK candidates (GPU default: up to 27)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import preprocess as bench
    import pipeline.geometry.winding as winding
    from pipeline.geometry.sdf import prepare_mesh, sdf_on_grid

    # Budgets sized from free GPU memory, as an 80 GB card gives them (older trees: whichever exist).
    winding._budget = lambda device: 1 << 27
    if hasattr(winding, "pair_budget"):
        winding.pair_budget = lambda device: 1 << 26
    v, f, name = bench.scan_mesh(args.mesh)
    if args.open:
        f, name = bench.opened(v, f), name + "_opened"
    vt, ft = torch.as_tensor(v, dtype=torch.float32), torch.as_tensor(f, dtype=torch.int64)
    census = Census()
    census.count_launches()
    t = time.perf_counter()
    with census:
        mesh = prepare_mesh(vt, ft)
        census.phase = "grid"
        sdf = sdf_on_grid(mesh, args.res, chunk=1 << args.chunk)
    c = census.totals
    print(f"{name} ({len(f):,} faces) at {args.res}^3, sign path {mesh.sign.method!r}, {sdf.coords.shape[0]:,} band "
          f"voxels ({time.perf_counter() - t:.0f} s in the interpreter)")
    print(f"ops: prep {c['prep ops']}, grid {c['grid ops']}; host reads: prep {c['prep reads']}, grid {c['grid reads']}")
    print("ops by function:")
    for (file, fn), n in census.ops.most_common(args.top):
        print(f"  {n:6d}  {file} {fn}")
    print("host reads by line:")
    for (file, line, fn), n in census.reads.most_common(args.top):
        print(f"  {n:6d}  {file}:{line} {fn}")


if __name__ == "__main__":
    main()
