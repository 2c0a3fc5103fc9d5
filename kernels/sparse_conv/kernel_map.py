"""Kernel maps for sparse convolution, built from sorted coordinate keys.

A kernel map says, for every output voxel and every kernel offset, which input
voxel it reads (or -1). It is built with a sort and binary searches
(``torch.searchsorted``), so it needs no hash table and no compiled extension,
and runs the same way on the CPU and the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def coord_keys(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """int64 key ((b·R + i)·R + j)·R + k of (N, 4) [batch, i, j, k] coordinates."""
    c = coords.to(torch.int64)
    r = int(resolution)
    return ((c[:, 0] * r + c[:, 1]) * r + c[:, 2]) * r + c[:, 3]


def kernel_offsets(kernel_size: int, device=None) -> torch.Tensor:
    """(K³, 3) int64 offsets d in [0, K)³ in (i, j, k) row-major order, matching conv3d weights."""
    r = torch.arange(kernel_size, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


@dataclass
class KernelMap:
    """Which input row every (output row, kernel offset) pair reads.

    ``neighbors[o, v]`` is the input row for output ``o`` at offset ``v`` or -1.
    ``inverse`` (built on first use) is the same map seen from the inputs, which
    the input gradient needs: ``inverse[i, v]`` is the output row that reads
    input ``i`` through offset ``v``, or -1.
    """

    neighbors: torch.Tensor  # (M, V) int32
    num_inputs: int
    symmetric: bool = False  # submanifold map: input and output sets equal, offsets centred
    _inverse: torch.Tensor | None = field(default=None, repr=False)
    _padded: dict = field(default_factory=dict, repr=False)

    @property
    def num_outputs(self) -> int:
        return self.neighbors.shape[0]

    @property
    def volume(self) -> int:
        return self.neighbors.shape[1]

    @property
    def inverse(self) -> torch.Tensor:
        if self._inverse is None and self.symmetric:
            # output o reads input i at offset d exactly when i reads o at offset −d
            self._inverse = self.neighbors.flip(1).contiguous()
        if self._inverse is None:
            nbr = self.neighbors.to(torch.int64)
            inv = torch.full((self.num_inputs, self.volume), -1, dtype=torch.int32, device=nbr.device)
            rows = torch.arange(self.num_outputs, device=nbr.device, dtype=torch.int32)
            for v in range(self.volume):
                ok = nbr[:, v] >= 0
                # each input is read at most once per offset, so this scatter has no collisions
                inv[nbr[ok, v], v] = rows[ok]
            self._inverse = inv
        return self._inverse


def padded_index(kmap: KernelMap, inverse: bool = False) -> torch.Tensor:
    """``kmap.neighbors`` (or ``kmap.inverse``) as int64 with -1 replaced by the row count it indexes (the zero row
    a gather appends); built once per map, which every conv on a structure shares forward and backward."""
    key = "inverse" if inverse else "neighbors"
    if key not in kmap._padded:
        table, missing = (kmap.inverse, kmap.num_outputs) if inverse else (kmap.neighbors, kmap.num_inputs)
        idx = table.to(torch.int64)
        kmap._padded[key] = idx.masked_fill_(idx < 0, missing)
    return kmap._padded[key]


def build_kernel_map(
    in_coords: torch.Tensor,
    out_coords: torch.Tensor,
    resolution: int,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int | None = None,
    in_sorted: bool = False,
    backend: str = "auto",
) -> KernelMap:
    """Kernel map of a sparse conv whose output voxel ``o`` reads input ``o·stride + d − padding``.

    ``in_coords`` (N, 4) and ``out_coords`` (M, 4) are [batch, i, j, k] int
    coordinates; ``resolution`` bounds the input grid. ``padding`` defaults to
    ``(kernel_size − 1) // 2`` (submanifold 3×3×3 for stride 1, kernel 3).
    With ``in_sorted`` the input keys are taken as already ascending. ``backend``: "triton" (one launch of
    binary searches, ``triton_map.py``), "torch" (a searchsorted per offset; the reference and CPU path) or
    "auto" (Triton on CUDA tensors).
    """
    if in_coords.ndim != 2 or in_coords.shape[1] != 4 or out_coords.ndim != 2 or out_coords.shape[1] != 4:
        raise ValueError(f"kernel map: coordinates must be (N, 4) [batch, i, j, k], got {tuple(in_coords.shape)} and {tuple(out_coords.shape)}")
    if padding is None:
        padding = (kernel_size - 1) // 2
    device = in_coords.device
    keys = coord_keys(in_coords, resolution)
    if in_sorted:
        sorted_keys, order = keys, None
    else:
        sorted_keys, order = torch.sort(keys)
    symmetric = out_coords is in_coords and stride == 1 and 2 * padding == kernel_size - 1
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        from .triton_map import lookup

        nbr = lookup(sorted_keys, order.to(torch.int32) if order is not None else None, out_coords, resolution,
                     kernel_size, stride, padding)
        return KernelMap(nbr, int(in_coords.shape[0]), symmetric=symmetric)
    if backend != "torch":
        raise ValueError(f"kernel map: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    offs = kernel_offsets(kernel_size, device) - padding
    base = out_coords[:, 1:].to(torch.int64) * stride
    batch = out_coords[:, :1].to(torch.int64)
    r = int(resolution)
    nbr = torch.empty((out_coords.shape[0], offs.shape[0]), dtype=torch.int32, device=device)
    n = sorted_keys.numel()
    for v in range(offs.shape[0]):
        q = base + offs[v]
        inside = ((q >= 0) & (q < r)).all(dim=1)
        qk = coord_keys(torch.cat([batch, q], dim=1), r)
        pos = torch.searchsorted(sorted_keys, qk).clamp_(max=n - 1)
        hit = inside & (sorted_keys[pos] == qk)
        idx = pos if order is None else order[pos]
        nbr[:, v] = torch.where(hit, idx, torch.full_like(idx, -1)).to(torch.int32)
    return KernelMap(nbr, int(in_coords.shape[0]), symmetric=symmetric)
