"""A PyTorch stand-in for the part of torchsparse (2.1) that the released Direct3D-S2 code calls.

Only what the release reaches is here: ``SparseTensor`` (feats ``F``, coords ``C`` as int32 [N, 4] of
(batch, x, y, z), ``stride``, ``spatial_range``, ``_caches``), ``nn.Conv3d`` with its ``kernel``
parameter, ``nn.functional.conv3d`` and ``utils.make_ntuple``.

Semantics follow torchsparse 2.1's default path (ImplicitGEMM dataflow, ``hashmap_on_the_fly``
kernel maps):
- kernel 1, stride 1: ``feats @ kernel`` (kernel [C_in, C_out]) plus bias;
- odd kernel, stride 1: submanifold conv, outputs on the input voxels; offset t of a K³ kernel
  (kernel [K³, C_in, C_out]) has coordinate column 1 (x) fastest, t = (iz·K + iy)·K + ix, and the
  output at p reads the input at p + (ix, iy, iz) − (K−1)/2 of the same batch; neighbours outside
  [0, max(coords)] per column are skipped as the hash-table query skips them;
- the kernel map is cached in ``_caches.kmaps`` under (tensor stride, kernel size, stride, dilation)
  and shared by tensors made with ``replace`` (the release copies ``_caches`` there), as torchsparse does.
Strided, transposed and generative convs are not used by the release and raise.
"""
from __future__ import annotations

import math
import sys
import types
from itertools import repeat

import torch
from torch import nn

__all__ = ["SparseTensor", "make_ntuple", "conv3d", "Conv3d", "submanifold_neighbors", "build_modules"]


def make_ntuple(x, ndim: int) -> tuple:
    if isinstance(x, int):
        x = tuple(repeat(x, ndim))
    elif isinstance(x, list):
        x = tuple(x)
    elif isinstance(x, torch.Tensor):
        x = tuple(x.view(-1).cpu().tolist())
    assert isinstance(x, tuple) and len(x) == ndim, x
    return x


class _Caches:
    def __init__(self):
        self.kmaps: dict = {}
        self.hashmaps: dict = {}
        self.cmaps: dict = {}


class SparseTensor:
    def __init__(self, feats: torch.Tensor, coords: torch.Tensor, stride=1, spatial_range=None):
        self.feats = feats
        self.coords = coords
        self.stride = make_ntuple(stride, ndim=3)
        self.spatial_range = None if spatial_range is None else make_ntuple(spatial_range, ndim=len(spatial_range))
        self._caches = _Caches()

    @property
    def F(self) -> torch.Tensor:
        return self.feats

    @F.setter
    def F(self, feats: torch.Tensor) -> None:
        self.feats = feats

    @property
    def C(self) -> torch.Tensor:
        return self.coords

    @C.setter
    def C(self, coords: torch.Tensor) -> None:
        self.coords = coords

    def dense(self):
        raise NotImplementedError("torchsparse stand-in: dense() is not used by the parity stages")


def submanifold_neighbors(coords: torch.Tensor, kernel_size: tuple) -> torch.Tensor:
    """Kernel map [N, V] of a submanifold conv: entry (o, t) is the input row at offset t of output o, or -1."""
    coords = coords.long()
    lo = torch.zeros(4, dtype=torch.long, device=coords.device)
    hi = coords.max(0).values
    span = hi - lo + 1
    # one integer key per voxel (batch slowest), as torchsparse's transform_coords builds it
    def key(c):
        return ((c[:, 0] * span[1] + c[:, 1]) * span[2] + c[:, 2]) * span[3] + c[:, 3]
    keys = key(coords)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    kx, ky, kz = kernel_size
    out = torch.full((coords.shape[0], kx * ky * kz), -1, dtype=torch.long, device=coords.device)
    t = 0
    for iz in range(kz):
        for iy in range(ky):
            for ix in range(kx):
                d = torch.tensor([0, ix - (kx - 1) // 2, iy - (ky - 1) // 2, iz - (kz - 1) // 2], device=coords.device)
                q = coords + d
                inside = ((q[:, 1:] >= lo[1:]) & (q[:, 1:] <= hi[1:])).all(1)
                qk = key(q)
                pos = torch.searchsorted(sorted_keys, qk).clamp(max=sorted_keys.numel() - 1)
                hit = inside & (sorted_keys[pos] == qk)
                out[:, t] = torch.where(hit, order[pos], torch.full_like(pos, -1))
                t += 1
    return out


def _apply_kmap(feats: torch.Tensor, weight: torch.Tensor, kmap: torch.Tensor) -> torch.Tensor:
    # float32 accumulation for every input dtype (the ImplicitGEMM kernels accumulate in float32)
    acc = torch.zeros(feats.shape[0], weight.shape[-1], dtype=torch.float32, device=feats.device)
    for t in range(kmap.shape[1]):
        idx = kmap[:, t]
        hit = idx >= 0
        if hit.any():
            rows = hit.nonzero().squeeze(1)
            acc.index_add_(0, rows, feats[idx[rows]].float() @ weight[t].float())
    return acc.to(feats.dtype)


def conv3d(input: SparseTensor, weight: torch.Tensor, kernel_size, bias=None, stride=1, padding=0,
           dilation=1, config=None, transposed: bool = False, generative: bool = False,
           training: bool = False) -> SparseTensor:
    kernel_size = make_ntuple(kernel_size, ndim=3)
    stride = make_ntuple(stride, ndim=3)
    dilation = make_ntuple(dilation, ndim=3)
    if transposed or generative or stride != (1, 1, 1) or dilation != (1, 1, 1):
        raise NotImplementedError("torchsparse stand-in: only stride-1 (submanifold) convs are used by the release")
    feats, coords = input.feats, input.coords
    if kernel_size == (1, 1, 1):
        out = feats.matmul(weight)
        if bias is not None:
            out = out + bias
        output = SparseTensor(coords=coords, feats=out, stride=input.stride, spatial_range=input.spatial_range)
    else:
        if any(k % 2 == 0 for k in kernel_size):
            raise NotImplementedError("torchsparse stand-in: even submanifold kernels are not used by the release")
        cache_key = (input.stride, kernel_size, stride, dilation)
        kmap = input._caches.kmaps.get(cache_key)
        if kmap is None:
            kmap = submanifold_neighbors(coords, kernel_size)
            input._caches.kmaps[cache_key] = kmap
        out = _apply_kmap(feats, weight, kmap)
        if bias is not None:
            out = out + bias
        output = SparseTensor(coords=coords, feats=out, stride=input.stride, spatial_range=input.spatial_range)
    output._caches = input._caches
    output._caches.cmaps.setdefault(output.stride, (output.coords, output.spatial_range))
    return output


class Conv3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0,
                 dilation: int = 1, bias: bool = False, transposed: bool = False,
                 generative: bool = False, config=None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = make_ntuple(kernel_size, ndim=3)
        self.stride = make_ntuple(stride, ndim=3)
        self.dilation = dilation
        _padding = make_ntuple(padding, 3)
        self.padding = tuple((k - 1) // 2 if k % 2 == 1 and s == 1 else p
                             for k, s, p in zip(self.kernel_size, self.stride, _padding))
        self.transposed = transposed
        self.generative = generative
        self._config = config
        self.kernel_volume = math.prod(self.kernel_size)
        if self.kernel_volume > 1 or self.stride != (1, 1, 1):
            self.kernel = nn.Parameter(torch.zeros(self.kernel_volume, in_channels, out_channels))
        else:
            self.kernel = nn.Parameter(torch.zeros(in_channels, out_channels))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)
        std = 1 / math.sqrt((out_channels if transposed else in_channels) * self.kernel_volume)
        with torch.no_grad():
            self.kernel.uniform_(-std, std)
            if self.bias is not None:
                self.bias.uniform_(-std, std)

    def forward(self, input: SparseTensor) -> SparseTensor:
        return conv3d(input, self.kernel, kernel_size=self.kernel_size, bias=self.bias, stride=self.stride,
                      padding=self.padding, dilation=self.dilation, config=self._config,
                      transposed=self.transposed, generative=self.generative, training=self.training)


def build_modules() -> dict[str, types.ModuleType]:
    """sys.modules entries: torchsparse, torchsparse.nn, torchsparse.nn.functional, torchsparse.utils."""
    root = types.ModuleType("torchsparse")
    root.__path__ = []  # a package, so that "import torchsparse.nn" resolves through sys.modules
    root.SparseTensor = SparseTensor
    root.__version__ = "2.1.0+parity-standin"
    tnn = types.ModuleType("torchsparse.nn")
    tnn.__path__ = []
    tnn.Conv3d = Conv3d
    fn = types.ModuleType("torchsparse.nn.functional")
    fn.conv3d = conv3d
    tnn.functional = fn
    utils = types.ModuleType("torchsparse.utils")
    utils.make_ntuple = make_ntuple
    root.nn = tnn
    root.utils = utils
    return {"torchsparse": root, "torchsparse.nn": tnn, "torchsparse.nn.functional": fn, "torchsparse.utils": utils}
