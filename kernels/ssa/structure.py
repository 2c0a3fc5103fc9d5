"""Block layout of a packed batch of sparse shapes, built once and shared by every SSA layer.

Tokens of all shapes are packed along one axis (``cu_seqlens`` gives each shape's
range) and must be sorted by 3D block so that every selection block (m_slc³) is a
contiguous range, and inside it every compression block (m_cmp³) too
(Direct3D-S2, Sec. 3.3). Window partitions (8³, shifted by 4 on alternate layers)
that do not coincide with the selection blocks get their own permutation.
"""
from __future__ import annotations

import torch


def _floor_div(x: torch.Tensor, m: int) -> torch.Tensor:
    return torch.div(x, m, rounding_mode="floor")


def _shape_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    counts = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(len(counts), device=cu_seqlens.device), counts, output_size=n)


def _block_key(coords: torch.Tensor, shape: torch.Tensor, m: int, shift: int = 0) -> torch.Tensor:
    """One int64 per token that orders (shape, block z, block y, block x) lexicographically."""
    b = _floor_div(coords.long() + shift, m)
    b = b - b.min(0).values
    r = (b.max(0).values + 1).tolist()
    return ((shape * r[0] + b[:, 0]) * r[1] + b[:, 1]) * r[2] + b[:, 2]


def _sort_key(coords, shape, cmp_block: int, slc_block: int) -> torch.Tensor:
    """Selection block first, then the compression block inside it, so both are contiguous."""
    sub = slc_block // cmp_block
    local = _floor_div(coords.long(), cmp_block) % sub
    inner = (local[:, 0] * sub + local[:, 1]) * sub + local[:, 2]
    return _block_key(coords, shape, slc_block) * sub**3 + inner


def _check_layout(coords: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must be (N, 3) integer voxel coordinates, got shape {tuple(coords.shape)}")
    if coords.is_floating_point() or coords.is_complex():
        raise ValueError(f"coords must be an integer tensor, got {coords.dtype}")
    if cu_seqlens.ndim != 1 or len(cu_seqlens) < 2 or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be a 1-D integer tensor of B+1 offsets")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != coords.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to N={coords.shape[0]}, got {cu[0]}..{cu[-1]}")
    for b in range(len(cu) - 1):
        if cu[b + 1] <= cu[b]:
            raise ValueError(f"shape {b} has no tokens (cu_seqlens[{b}]={cu[b]}, cu_seqlens[{b + 1}]={cu[b + 1]})")


def block_order(coords: torch.Tensor, cu_seqlens: torch.Tensor, cmp_block: int = 4, slc_block: int = 8) -> torch.Tensor:
    """Permutation that sorts tokens by (shape, selection block, compression block); apply it to features and coords."""
    cu_seqlens = cu_seqlens.to(coords.device)
    _check_layout(coords, cu_seqlens)
    shape = _shape_ids(cu_seqlens, coords.shape[0])
    return torch.sort(_sort_key(coords, shape, cmp_block, slc_block), stable=True).indices


def _boundaries(key: torch.Tensor) -> torch.Tensor:
    """Offsets (n_blocks + 1) of the runs of equal keys in an already grouped key."""
    n = key.numel()
    change = torch.ones(n, dtype=torch.bool, device=key.device)
    change[1:] = key[1:] != key[:-1]
    start = torch.nonzero(change).flatten()
    return torch.cat([start, torch.tensor([n], device=key.device)])


def _tiles(offsets: torch.Tensor, size: int):
    """Split each range [offsets[i], offsets[i+1]) into pieces of at most ``size``.

    Returns (start, end, segment of each piece, piece offsets per segment)."""
    lengths = offsets[1:] - offsets[:-1]
    per_seg = (lengths + size - 1) // size
    piece_off = torch.zeros(len(per_seg) + 1, dtype=torch.long, device=offsets.device)
    piece_off[1:] = torch.cumsum(per_seg, 0)
    n = int(piece_off[-1])
    seg = torch.repeat_interleave(torch.arange(len(per_seg), device=offsets.device), per_seg, output_size=n)
    start = offsets[seg] + (torch.arange(n, device=offsets.device) - piece_off[seg]) * size
    end = torch.minimum(start + size, offsets[seg + 1])
    i32 = torch.int32
    return start.to(i32), end.to(i32), seg.to(i32), piece_off.to(i32)


class SSAStructure:
    """Offsets of compression, selection and window blocks of a sorted packed batch.

    Build once per batch of shapes (``SSAStructure(coords, cu_seqlens)``) and pass to
    every layer; tiles for each kernel configuration are cached on first use.
    """

    def __init__(self, coords: torch.Tensor, cu_seqlens: torch.Tensor, cmp_block: int = 4, slc_block: int = 8,
                 window: int = 8, window_shift: int = 4):
        for name, m in (("cmp_block", cmp_block), ("slc_block", slc_block), ("window", window)):
            if not isinstance(m, int) or m < 1:
                raise ValueError(f"{name} must be a positive int, got {m!r}")
        if slc_block % cmp_block:
            raise ValueError(f"slc_block ({slc_block}) must be a multiple of cmp_block ({cmp_block})")
        dev = coords.device
        cu_seqlens = cu_seqlens.to(dev).long()
        _check_layout(coords, cu_seqlens)
        n = coords.shape[0]
        shape = _shape_ids(cu_seqlens, n)
        key = _sort_key(coords, shape, cmp_block, slc_block)
        if n > 1 and bool((key[1:] < key[:-1]).any()):
            raise ValueError("tokens are not sorted by 3D block: reorder features and coords with "
                             "kernels.ssa.block_order(coords, cu_seqlens, cmp_block, slc_block) first")
        self.device = dev
        self.n_tokens = n
        self.n_shapes = len(cu_seqlens) - 1
        self.cmp_block, self.slc_block, self.window, self.window_shift = cmp_block, slc_block, window, window_shift
        self.cu_seqlens = cu_seqlens
        self.shape_of_token = shape
        sub = slc_block // cmp_block
        self.cmp_offsets = _boundaries(key)
        self.slc_offsets = _boundaries(torch.div(key, sub**3, rounding_mode="floor"))
        self.n_cmp = len(self.cmp_offsets) - 1
        self.n_slc = len(self.slc_offsets) - 1
        self.cmp_of_token = torch.repeat_interleave(
            torch.arange(self.n_cmp, device=dev), self.cmp_offsets[1:] - self.cmp_offsets[:-1], output_size=n)
        self.slc_of_token = torch.repeat_interleave(
            torch.arange(self.n_slc, device=dev), self.slc_offsets[1:] - self.slc_offsets[:-1], output_size=n)
        # position of each token inside its compression block, for the learnable intra-block term
        local = coords.long() - _floor_div(coords.long(), cmp_block) * cmp_block
        self.intra_cmp = (local[:, 0] * cmp_block + local[:, 1]) * cmp_block + local[:, 2]
        # first compression / selection block of each shape (B+1)
        cmp_shape = shape[self.cmp_offsets[:-1]]
        slc_shape = shape[self.slc_offsets[:-1]]
        self.cmp_shape_offsets = torch.searchsorted(cmp_shape, torch.arange(self.n_shapes + 1, device=dev))
        self.slc_shape_offsets = torch.searchsorted(slc_shape, torch.arange(self.n_shapes + 1, device=dev))
        # selection block (index local to the shape) of every compression block
        slc_of_cmp = self.slc_of_token[self.cmp_offsets[:-1]]
        self.cmp_to_slc_local = (slc_of_cmp - self.slc_shape_offsets[cmp_shape]).to(torch.int32)
        self.max_slc_per_shape = int((self.slc_shape_offsets[1:] - self.slc_shape_offsets[:-1]).max())
        self.max_cmp_per_shape = int((self.cmp_shape_offsets[1:] - self.cmp_shape_offsets[:-1]).max())
        self._windows = {}
        for s in {0, window_shift}:
            if s == 0 and window == slc_block:
                self._windows[s] = (None, self.slc_offsets)
                continue
            wkey = _block_key(coords, shape, window, s)
            perm = torch.sort(wkey, stable=True).indices
            self._windows[s] = (perm, _boundaries(wkey[perm]))
        self._cache = {}
        self._coords = coords

    def window_partition(self, shifted: bool):
        """(permutation into window order or None when tokens are already in it, window offsets)."""
        return self._windows[self.window_shift if shifted else 0]

    def window_ids(self, shifted: bool) -> torch.Tensor:
        """Window index of every token in the structure's token order."""
        perm, off = self.window_partition(shifted)
        ids = torch.repeat_interleave(torch.arange(len(off) - 1, device=self.device), off[1:] - off[:-1],
                                      output_size=self.n_tokens)
        if perm is None:
            return ids
        out = torch.empty_like(ids)
        out[perm] = ids
        return out

    def tiles(self, kind: str, size: int):
        """Query tiles of at most ``size`` tokens that never straddle a shape ('shape') or a window."""
        k = ("tiles", kind, size)
        if k not in self._cache:
            if kind == "shape":
                off = self.cu_seqlens
            elif kind in ("window0", "window1"):
                off = self.window_partition(kind == "window1")[1]
            else:
                raise ValueError(f"unknown tile kind {kind!r}")
            self._cache[k] = _tiles(off, size)
        return self._cache[k]

    def n_tiles(self, kind: str, size: int) -> int:
        """Number of tiles of ``tiles(kind, size)`` as a Python int (read from the device once, then cached)."""
        return self.cached(("n_tiles", kind, size), lambda: int(self.tiles(kind, size)[3][-1]))

    def chunks(self, kind: str, size: int):
        """Key/value chunks of at most ``size`` rows inside one segment, for the dK/dV kernel."""
        k = ("chunks", kind, size)
        if k not in self._cache:
            if kind == "cmp":  # compressed tokens grouped by shape
                off = self.cmp_shape_offsets
            elif kind == "slc":
                off = self.slc_offsets
            elif kind in ("window0", "window1"):
                off = self.window_partition(kind == "window1")[1]
            else:
                raise ValueError(f"unknown chunk kind {kind!r}")
            self._cache[k] = _tiles(off, size)
        return self._cache[k]

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]
