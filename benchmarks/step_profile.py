"""Where a step's time goes, by kind of work: GEMMs, SSA kernels, other attention, sparse convolution,
optimizer, communication, norms/modulation/elementwise, and the host gaps in which the device is idle.

Used by ``benchmarks/train_dit.py --profile N`` (and anything else that can hand it a step function):
the step runs N times under ``torch.profiler``; every device kernel is put in one category by its name
(our Triton kernels by the names of the JIT functions in ``kernels/ssa`` and ``kernels/sparse_conv``),
and the idle time is the step's wall time minus the union of the kernels' intervals, so the rows and
the gap add up to the wall time. Kernel names are those of CUDA (cuBLAS/CUTLASS GEMMs, cuDNN and flash
attention, NCCL, ATen's elementwise and reduction kernels).
"""
from __future__ import annotations

import importlib
import pkgutil
import re
import time
from collections import defaultdict
from typing import Callable, Iterable

import torch

# Order matters: the first pattern that matches names the category.
PATTERNS: list[tuple[str, re.Pattern]] = [
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter|broadcast", re.I)),
    # no bare "lamb": every elementwise kernel PyTorch builds from a lambda has "lambda" in its name
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|sgd|clip_grad", re.I)),
    ("other attention", re.compile(r"flash|fmha|cudnn.*(attn|attention|sdpa)|attention|sdpa|efficient_attention"
                                   r"|aten::_?scaled_dot_product", re.I)),
    ("GEMM (linears)", re.compile(r"gemm|cutlass|cublas|xmma|wgmma|nvjet|ampere_|sm\d+_|hopper|"
                                  r"aten::\w*(mm|matmul|linear)\w*$", re.I)),
    ("norms, modulation, elementwise", re.compile(r"norm|elementwise|vectorized|unrolled|reduce|softmax|silu|gelu|"
                                                  r"mul|add|copy|cat|fill|index|scatter|gather|where|exp|rsqrt|"
                                                  r"pow|mean|sum|aten::", re.I)),
]
SSA, CONV, OTHER, GAPS = "SSA kernels", "sparse convolution", "other kernels", "host gaps (device idle)"


def triton_kernel_names(packages: Iterable[str] = ("kernels.ssa", "kernels.sparse_conv")) -> dict[str, set[str]]:
    """package -> names of its Triton JIT functions (autotuned ones included)."""
    out: dict[str, set[str]] = {}
    for pkg_name in packages:
        pkg = importlib.import_module(pkg_name)
        names: set[str] = set()
        mods = [pkg] + [importlib.import_module(f"{pkg_name}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
        for mod in mods:
            for name, obj in vars(mod).items():
                fn = getattr(obj, "fn", obj)  # an Autotuner/Heuristics wraps the JIT function
                fn = getattr(fn, "fn", fn)
                if type(obj).__name__ in ("JITFunction", "InterpretedFunction", "Autotuner", "Heuristics") and callable(fn):
                    names.add(getattr(fn, "__name__", name))
        out[pkg_name] = names
    return out


def categorize(name: str, ssa: set[str], conv: set[str]) -> str:
    base = name.split("(")[0].strip()
    if base in ssa:
        return SSA
    if base in conv:
        return CONV
    for cat, pat in PATTERNS:
        if pat.search(name):
            return cat
    return OTHER


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping [start, end) intervals (kernels on several streams)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def breakdown(kernels: list[tuple[str, float, float]], wall_us: float, ssa: set[str] = frozenset(),
              conv: set[str] = frozenset()) -> tuple[dict[str, float], dict[str, float]]:
    """(category -> µs, kernel name -> µs) from (name, start µs, end µs) kernel records over ``wall_us``.

    Category times are the kernels' own durations; where kernels of several streams overlap, the overlap is
    taken out of the categories in proportion, so that categories + host gaps = wall time."""
    by_cat: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for name, s, e in kernels:
        by_cat[categorize(name, ssa, conv)] += e - s
        by_name[name] += e - s
    busy = union_length([(s, e) for _, s, e in kernels])
    summed = sum(by_cat.values())
    scale = busy / summed if summed > 0 else 1.0
    cats = {k: v * scale for k, v in by_cat.items()}
    cats[GAPS] = max(wall_us - busy, 0.0)
    return cats, dict(by_name)


def profile_step(step: Callable[[], object], iters: int = 5, device: torch.device | None = None,
                 ops: dict[str, float] | None = None):
    """Run ``step`` ``iters`` times under the profiler; returns (category -> ms per step, top kernels, wall ms).

    On a CUDA device the device kernels are counted; on the CPU the ATen ops' own times stand in for them.
    Given a dict as ``ops``, it is filled with the device ms per step of each (op, input shapes): the
    kernels an op launched itself, so elementwise time can be traced to the ops that cost it (input shapes
    are recorded only then: recording them adds host time)."""
    cuda = device is not None and device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sync()
    with torch.profiler.profile(activities=acts, record_shapes=ops is not None) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    records, t = [], 0.0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            if cuda:
                records.append((ev.name, float(ev.time_range.start), float(ev.time_range.end)))
        elif not cuda and ev.name.startswith("aten::") and ev.self_cpu_time_total > 0:
            # one thread: each op's own time, laid end to end (nested ops are not counted twice)
            records.append((ev.name, t, t + float(ev.self_cpu_time_total)))
            t += float(ev.self_cpu_time_total)
    names = triton_kernel_names()
    cats, kernels = breakdown(records, wall_us, names["kernels.ssa"], names["kernels.sparse_conv"])
    per = lambda d: {k: v / iters / 1e3 for k, v in d.items()}  # noqa: E731  µs over N steps -> ms per step
    if ops is not None:
        ops.update(per(op_device_times(prof, cuda)))
    return per(cats), per(kernels), wall_us / iters / 1e3


def op_device_times(prof, cuda: bool) -> dict[str, float]:
    """µs of each (op, input shapes) over the profiled steps: its own device kernels on CUDA, its own CPU
    time on the CPU."""
    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        if getattr(e, "device_type", None) not in (None, torch.autograd.DeviceType.CPU):
            continue  # a kernel's own entry: its time is already its launching op's
        us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)) if cuda \
            else e.self_cpu_time_total
        if us > 0 and not e.key.startswith("ProfilerStep"):
            shapes = ", ".join(str(tuple(s)) for s in (e.input_shapes or []) if s)
            out[f"{e.key} {shapes}".strip()] += float(us)
    return dict(out)


def print_ops(ops: dict[str, float], top: int = 25) -> None:
    print("\n| op (input shapes) | device ms per step |\n| --- | ---: |")
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| `{k[:110]}` | {v:.2f} |")


def print_breakdown(cats: dict[str, float], kernels: dict[str, float], wall_ms: float, top: int = 12,
                    title: str = "") -> None:
    if title:
        print(f"\n{title}")
    print("| where the step goes | ms per step | share |")
    print("| --- | ---: | ---: |")
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} | {100 * v / wall_ms:.1f}% |")
    print(f"| **step (wall)** | **{wall_ms:.2f}** | 100% |")
    print(f"\n| top kernels | ms per step |\n| --- | ---: |")
    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| `{k[:90]}` | {v:.2f} |")
