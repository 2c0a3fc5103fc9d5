"""A sampler's velocity as a replayed CUDA graph.

Every Euler step of a stage runs the same network on tensors of the same shapes: the structure DiT on a
fixed grid, the sparse DiTs on one shape's cached token structure (``x.replace`` keeps it). A CUDA graph
records the kernels of one forward once and replays them with one call, with no launch from Python. The
cascade uses it for the stages whose steps wait on the host's launches (GenerationConfig.cuda_graphs and
cuda_graph_max_tokens): the structure stage and the 512 stage of one mesh (3.7–4.7 -> 3.3–3.4 s for the
512 stage on an H100); the 1024 stage's steps are bound by the GPU and run eagerly (benchmarks/RESULTS.md
"Generation").

``CapturedVelocity(fn)`` wraps a ``velocity(x, t, cond)`` closure. Its first call runs eagerly (that call
builds what the network caches: the SSA structure, the offsets it reads to the host, Triton's compiled
kernels), its second captures the forward into a graph, and every call from then on copies ``x`` and ``t``
into the graph's input buffers and replays it. A forward that cannot be captured (a host sync left in it)
falls back to eager calls for the rest of the stage, with one warning naming the error. On the CPU, with
gradients enabled, or with ``enabled=False`` it is the plain closure.

The graph owns its memory pool (the activations of one forward) until the wrapper is dropped, so each
stage builds its own and lets it go when the stage ends.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


class CapturedVelocity:
    def __init__(self, fn: Callable, enabled: bool = True, eager_calls: int = 1):
        self.fn, self.enabled, self.eager_calls = fn, enabled, eager_calls
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None
        self._key = None
        self._x = self._t = self._out = None

    def _usable(self, x: torch.Tensor) -> bool:
        return (self.enabled and self.failed is None and x.device.type == "cuda"
                and not torch.is_grad_enabled())

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if not self._usable(x):
            return self.fn(x, t, cond)
        key = (x.shape, x.dtype, x.device, t.shape, t.dtype)
        if self.graph is not None and key != self._key:  # another shape: a new graph
            self.release()
        self.calls += 1
        if self.graph is None:
            if self.calls <= self.eager_calls:
                return self.fn(x, t, cond)
            if not self._capture(x, t, cond, key):
                return self.fn(x, t, cond)
        self._x.copy_(x)
        self._t.copy_(t)
        self.graph.replay()
        return self._out.clone()

    def _capture(self, x, t, cond, key) -> bool:
        self._x, self._t = x.detach().clone(), t.detach().clone()
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(x.device)
            # thread_local: another thread's CUDA work (a Serve replica's) is not an error during capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.fn(self._x, self._t, cond)
        except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly from here on
            self.failed = f"{type(e).__name__}: {e}"
            log.warning("sampling step not captured as a CUDA graph, running eagerly: %s", self.failed)
            self._x = self._t = None
            torch.cuda.synchronize(x.device)
            return False
        self.graph, self._out, self._key = graph, out, key
        return True

    def release(self) -> None:
        """Drop the graph and its memory pool; the next shape starts with an eager call again."""
        self.graph = self._x = self._t = self._out = None
        self._key = None
        self.calls = 0
