"""Sparse layers named like their torch.nn counterparts; each takes and returns a SparseTensor."""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.group_norm import segment_group_norm_act
from kernels.sparse_conv import coord_keys, kernel_offsets, sparse_conv

from .tensor import SparseTensor


def _norm_dtype(t: torch.Tensor) -> torch.Tensor:
    # statistics of half-precision features are taken in float32
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _expect_channels(name: str, x: SparseTensor, channels: int) -> None:
    if x.num_channels != channels:
        raise ValueError(f"{name}: input has {x.num_channels} channels, layer expects {channels}")


class SparseLinear(nn.Linear):
    def forward(self, x: SparseTensor) -> SparseTensor:
        _expect_channels("SparseLinear", x, self.in_features)
        return x.replace(super().forward(x.feats))


class SparseSiLU(nn.SiLU):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


# kernels/group_norm by shape segments: "auto" runs the Triton kernel on CUDA tensors (Chan-merged float32
# statistics), "torch" the PyTorch path (float64 sums; every CPU tensor takes it). "auto" since the H100 A/B in
# RESULTS ("One sampling step"; benchmarks/sample_step.py --off group-norm restores the PyTorch path).
GROUP_NORM_BACKEND = "auto"


class SparseGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per batch element over its active voxels only (kernels/group_norm:
    ``segment_group_norm_act``: float64 sums in PyTorch, or its Triton kernel on CUDA with GROUP_NORM_BACKEND
    "auto").
    ``silu=True`` applies the SiLU that follows it in the same pass (`run_layers`)."""

    def forward(self, x: SparseTensor, silu: bool = False) -> SparseTensor:
        _expect_channels("SparseGroupNorm", x, self.num_channels)
        offsets = [0] + [s.stop for s in x.layout]
        return x.replace(segment_group_norm_act(x.feats, offsets, self.num_groups, self.weight if self.affine
                                                else None, self.bias if self.affine else None, self.eps, silu,
                                                GROUP_NORM_BACKEND))


def run_layers(layers: nn.Sequential, x: SparseTensor) -> SparseTensor:
    """``layers(x)``, with each SparseGroupNorm that a SparseSiLU follows run as one fused norm + SiLU (same
    modules and state-dict keys; the sequence's result is the same)."""
    mods = list(layers)
    i = 0
    while i < len(mods):
        if type(mods[i]) is SparseGroupNorm and i + 1 < len(mods) and type(mods[i + 1]) is SparseSiLU:
            x = mods[i](x, silu=True)
            i += 2
        else:
            x = mods[i](x)
            i += 1
    return x


class SparseLayerNorm(nn.LayerNorm):
    """Per-voxel normalisation over channels: a decoder built from it decodes chunk by chunk exactly."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(_norm_dtype(x.feats)).to(x.dtype))


def _kernel_side(kernel: torch.Tensor, name: str) -> int:
    if kernel.ndim != 3:
        raise ValueError(f"{name}: expected a kernel (K³, C_in, C_out), got shape {tuple(kernel.shape)}")
    side = round(kernel.shape[0] ** (1 / 3))
    if side ** 3 != kernel.shape[0]:
        raise ValueError(f"{name}: {kernel.shape[0]} kernel offsets is not a cube K³")
    return side


def kernel_from_torchsparse(kernel: torch.Tensor) -> torch.Tensor:
    """A torchsparse Conv3d ``kernel`` (K³, C_in, C_out) as our SparseConv3d / SparseConvDown ``weight``.

    torchsparse (2.x, ``get_kernel_offsets`` and the hash-table lookup) numbers the offsets of an odd
    kernel with x fastest: t = (dz·K + dy)·K + dx, where (x, y, z) are coordinate columns 1..3 and the
    output at p reads the input at p + d − (K−1)/2. Ours numbers them with the last column fastest,
    v = (dx·K + dy)·K + dz, over the same offsets. An even kernel (the strided K = stride = 2 case) is
    numbered x-slowest by torchsparse too, reading p·stride + d: the same order as ours.
    """
    side = _kernel_side(kernel, "kernel_from_torchsparse")
    if side % 2 == 0:
        return kernel.clone()
    c_in, c_out = kernel.shape[1:]
    # [dz, dy, dx] -> [dx, dy, dz]
    return kernel.reshape(side, side, side, c_in, c_out).permute(2, 1, 0, 3, 4).reshape(-1, c_in, c_out).contiguous()


def kernel_to_torchsparse(kernel: torch.Tensor) -> torch.Tensor:
    """Our sparse-conv ``weight`` (K³, C_in, C_out) in torchsparse's offset order (inverse of kernel_from_torchsparse)."""
    _kernel_side(kernel, "kernel_to_torchsparse")
    # reversing the three offset axes is its own inverse
    return kernel_from_torchsparse(kernel)


class _SparseConvBase(nn.Module):
    """Weight (V, C_in, C_out) with conv3d's default init, an optional bias, and the conv over a kernel map."""

    def __init__(self, in_channels: int, out_channels: int, volume: int, bias: bool):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        bound = 1.0 / math.sqrt(in_channels * volume)
        self.weight = nn.Parameter(torch.empty(volume, in_channels, out_channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def _conv(self, x: SparseTensor, kmap) -> torch.Tensor:
        _expect_channels(type(self).__name__, x, self.in_channels)
        out = sparse_conv(x.feats, self.weight, kmap)
        return out + self.bias.to(out.dtype) if self.bias is not None else out


class SparseConv3d(_SparseConvBase):
    """Submanifold convolution: outputs on the input voxels, kernel_size³ neighbourhood (3×3×3 by default)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        if kernel_size % 2 != 1:
            raise ValueError(f"SparseConv3d: kernel_size must be odd for a submanifold conv, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size ** 3, bias)
        self.kernel_size = kernel_size

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(self._conv(x, x.submanifold_map(self.kernel_size)))


def _coarse_tensor(x: SparseTensor, feats: torch.Tensor, stride: int) -> SparseTensor:
    coarse, _ = x.coarse(stride)
    return SparseTensor(coarse, feats, x.resolution // stride, x.batch_size, check=False)


class SparseDownsample(nn.Module):
    """Mean pool by ``stride`` (2): each coarse voxel averages its active children.

    ``zero_in_mean`` averages one zero in with the children (sum / (children + 1)): what the released
    SS-VAE computes, its ``scatter_reduce(..., "mean")`` counting the zero it starts from (include_self).
    """

    def __init__(self, stride: int = 2, zero_in_mean: bool = False):
        super().__init__()
        self.stride = stride
        self.zero_in_mean = zero_in_mean

    def forward(self, x: SparseTensor) -> SparseTensor:
        coarse, parent = x.coarse(self.stride)
        # summed in float32 at least: half-precision sums of many children overflow
        acc = torch.promote_types(x.dtype, torch.float32)
        total = x.feats.new_zeros(coarse.shape[0], x.num_channels, dtype=acc).index_add(0, parent, x.feats.to(acc))
        count = torch.bincount(parent, minlength=coarse.shape[0]).to(acc) + int(self.zero_in_mean)
        return _coarse_tensor(x, (total / count[:, None]).to(x.dtype), self.stride)


class SparseConvDown(_SparseConvBase):
    """Strided convolution, kernel = stride = 2: each coarse voxel mixes its 8 children with learned weights."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2, bias: bool = True):
        super().__init__(in_channels, out_channels, stride ** 3, bias)
        self.stride = stride

    def forward(self, x: SparseTensor) -> SparseTensor:
        return _coarse_tensor(x, self._conv(x, x.downsample_map(self.stride)), self.stride)


def subdivide_structure(x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of all 8 children of every voxel at 2× resolution (sorted), and each child's parent row."""
    key = ("subdivide", 2)
    if key not in x.cache:
        offs = kernel_offsets(2, x.coords.device).to(torch.int32)  # (8, 3)
        child = x.coords[:, None, :].repeat(1, 8, 1)
        child[:, :, 1:] = child[:, :, 1:] * 2 + offs
        child = child.reshape(-1, 4)
        parent = torch.arange(len(x), device=x.coords.device).repeat_interleave(8)
        order = torch.argsort(coord_keys(child, x.resolution * 2))
        x.cache[key] = (child[order].contiguous(), parent[order])
    return x.cache[key]


class SparseSubdivide(nn.Module):
    """×2 upsampling into all 8 children; each child starts with its parent's features."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        child, parent = subdivide_structure(x)
        return SparseTensor(child, x.feats[parent], x.resolution * 2, x.batch_size, check=False)
