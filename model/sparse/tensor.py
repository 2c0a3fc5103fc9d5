"""SparseTensor: the one sparse type of the networks: every sparse layer, the SS-VAE, the SS-DiT and SSA
take and return it, and the structures built from its coordinates live on it."""

from __future__ import annotations

import torch

from kernels.sparse_conv import KernelMap, build_kernel_map, coord_keys, kernel_offsets


class SparseTensor:
    """Features on the active voxels of a batch of grids.

    ``coords`` (N, 4) int32 [batch, i, j, k], free of duplicates, the rows of each batch element
    together and in batch order; ``feats`` (N, C); ``resolution`` R bounds i, j, k. ``ordered``
    (the default): rows sorted by key ((b·R + i)·R + j)·R + k, what sparse convolutions need. A
    ``packed`` tensor keeps its tokens in the caller's order within each shape (the SS-DiT's and
    SSA's input: per-token layers and attention do not depend on the order).
    ``cache`` holds what is built from the coordinates: kernel maps, pooled structures, ``cu_seqlens``,
    the SSA block structure; ``replace`` shares it, so each is built once per structure and reused by
    every layer (and every sampler step) that runs on it.
    """

    def __init__(self, coords: torch.Tensor, feats: torch.Tensor, resolution: int,
                 batch_size: int | None = None, cache: dict | None = None, check: bool = True,
                 ordered: bool = True):
        if check:
            _check_structure(coords, feats, resolution, "sorted" if ordered else "grouped")
        self.coords = coords
        self.feats = feats
        self.resolution = int(resolution)
        self.batch_size = int(coords[-1, 0].item()) + 1 if batch_size is None else int(batch_size)
        self.cache = {} if cache is None else cache
        self.ordered = bool(ordered)

    @classmethod
    def from_unsorted(cls, coords: torch.Tensor, feats: torch.Tensor, resolution: int,
                      batch_size: int | None = None) -> "SparseTensor":
        """Sort rows by key first (coordinates still must be unique and in range)."""
        _check_structure(coords, feats, resolution, "any")
        order = torch.argsort(coord_keys(coords, resolution))
        return cls(coords[order].contiguous(), feats[order], resolution, batch_size)

    @classmethod
    def from_samples(cls, coords: list[torch.Tensor], feats: list[torch.Tensor], resolution: int | None = None,
                     device: torch.device | str | None = None, ordered: bool = True) -> "SparseTensor":
        """A batch of grids from each one's voxels (N_i, 3) and features (N_i, C) (or values (N_i,)).

        ``ordered``: rows sorted by key; else packed, each shape's rows in the order given.
        ``resolution`` None: one more than the largest coordinate."""
        if not coords or len(coords) != len(feats):
            raise ValueError(f"SparseTensor.from_samples: {len(coords)} coordinate and {len(feats)} feature sets")
        c = torch.cat([torch.cat([torch.full_like(ci[:, :1], b, dtype=torch.int32), ci.to(torch.int32)], 1)
                       for b, ci in enumerate(coords)])
        f = torch.cat([fi.reshape(len(fi), -1) for fi in feats])
        device = c.device if device is None else device
        c, f = c.to(device), f.to(device)
        if resolution is None:
            resolution = int(c[:, 1:].max()) + 1 if len(c) else 1
        if ordered:
            return cls.from_unsorted(c, f, resolution, len(coords))
        return cls(c, f, resolution, len(coords), ordered=False)

    @classmethod
    def packed(cls, coords: torch.Tensor, feats: torch.Tensor, cu_seqlens: torch.Tensor,
               resolution: int | None = None) -> "SparseTensor":
        """Tokens of several shapes packed without padding: coords (N, 3), feats (N, C), shape b's rows
        ``cu_seqlens[b]:cu_seqlens[b + 1]`` in any order within it."""
        if cu_seqlens.ndim != 1 or len(cu_seqlens) < 2 or int(cu_seqlens[-1]) != coords.shape[0]:
            raise ValueError(f"SparseTensor.packed: cu_seqlens must be (B + 1,) ending at {coords.shape[0]} tokens, "
                             f"got {tuple(cu_seqlens.shape)} ending at {int(cu_seqlens[-1]) if len(cu_seqlens) else None}")
        cu = cu_seqlens.to(coords.device).long()
        batch = torch.repeat_interleave(torch.arange(len(cu) - 1, device=coords.device), cu[1:] - cu[:-1])
        c = torch.cat([batch[:, None].to(torch.int32), coords.to(torch.int32)], 1)
        if resolution is None:
            resolution = int(c[:, 1:].max()) + 1 if len(c) else 1
        out = cls(c, feats, resolution, len(cu) - 1, ordered=False)
        out.cache["cu_seqlens"] = cu
        return out

    # -- structure -----------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.feats.shape

    @property
    def num_channels(self) -> int:
        return self.feats.shape[1]

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    def __len__(self) -> int:
        return self.coords.shape[0]

    @property
    def layout(self) -> list[slice]:
        """Row range of each batch element (rows are grouped by batch because keys start with it)."""
        if "layout" not in self.cache:
            counts = torch.bincount(self.coords[:, 0].long(), minlength=self.batch_size).tolist()
            bounds, start = [], 0
            for c in counts:
                bounds.append(slice(start, start + c))
                start += c
            self.cache["layout"] = bounds
        return self.cache["layout"]

    @property
    def batch_index(self) -> torch.Tensor:
        return self.coords[:, 0].long()

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """(B + 1,) int64 row offsets of the batch elements (rows are grouped by batch element)."""
        if "cu_seqlens" not in self.cache:
            counts = torch.bincount(self.batch_index, minlength=self.batch_size)
            self.cache["cu_seqlens"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return self.cache["cu_seqlens"]

    def keys(self) -> torch.Tensor:
        if "keys" not in self.cache:
            self.cache["keys"] = coord_keys(self.coords, self.resolution)
        return self.cache["keys"]

    def replace(self, feats: torch.Tensor) -> "SparseTensor":
        """Same structure (and cached maps), new features."""
        if feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"SparseTensor.replace: {feats.shape[0]} feature rows for {self.coords.shape[0]} voxels")
        return SparseTensor(self.coords, feats, self.resolution, self.batch_size, self.cache, check=False,
                            ordered=self.ordered)

    def _need_order(self, what: str) -> None:
        if not self.ordered:
            raise ValueError(f"SparseTensor: {what} needs rows in key order; this one is packed "
                             "(SparseTensor.from_unsorted sorts)")

    # -- kernel maps, cached by kind and stride ------------------------------
    def submanifold_map(self, kernel_size: int = 3) -> KernelMap:
        key = ("submanifold", kernel_size, 1)
        self._need_order("a sparse convolution")
        if key not in self.cache:
            if self.device.type == "cpu" and self.batch_size * self.resolution ** 3 <= _TABLE_LIMIT:
                self.cache[key] = _table_submanifold_map(self, kernel_size)
            else:
                self.cache[key] = build_kernel_map(self.coords, self.coords, self.resolution, kernel_size,
                                                   stride=1, in_sorted=True)
        return self.cache[key]

    def coarse(self, stride: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates of the ×stride coarser grid covering these voxels, and each voxel's parent row."""
        key = ("coarse", stride)
        self._need_order("pooling to a coarser grid")
        if key not in self.cache:
            parent = self.coords.clone()
            parent[:, 1:] //= stride
            pkeys = coord_keys(parent, self.resolution // stride)
            # keys of sorted fine voxels are not sorted after //, so unique sorts them
            ukeys, inverse = torch.unique(pkeys, return_inverse=True)
            first = torch.full((ukeys.numel(),), parent.shape[0], dtype=torch.long, device=parent.device)
            first.scatter_reduce_(0, inverse, torch.arange(parent.shape[0], device=parent.device), "amin")
            self.cache[key] = (parent[first].contiguous(), inverse)
        return self.cache[key]

    def downsample_map(self, stride: int = 2) -> KernelMap:
        """Map of the stride×stride×stride conv from these voxels to ``coarse(stride)``."""
        key = ("down", stride)
        if key not in self.cache:
            coarse, _ = self.coarse(stride)
            self.cache[key] = build_kernel_map(self.coords, coarse, self.resolution, stride, stride=stride,
                                               padding=0, in_sorted=True)
        return self.cache[key]

    def __repr__(self) -> str:
        return (f"SparseTensor(voxels={len(self)}, channels={self.num_channels}, resolution={self.resolution}, "
                f"batch={self.batch_size}, dtype={self.dtype}, device={self.device}"
                f"{'' if self.ordered else ', packed'})")


# Grids of at most this many cells (batch × R³) find CPU neighbours in a dense index table.
_TABLE_LIMIT = 1 << 24


def _table_submanifold_map(x: SparseTensor, kernel_size: int) -> KernelMap:
    """build_kernel_map's submanifold map through a dense row table (4 bytes a cell): a gather per offset
    instead of a binary search, 5-10x faster on a CPU at 64³ (docs/demo.md)."""
    r, pad = x.resolution, (kernel_size - 1) // 2
    table = torch.full((x.batch_size * r ** 3,), -1, dtype=torch.int32)
    table[x.keys()] = torch.arange(len(x), dtype=torch.int32)
    # inside[a][o]: the neighbour at offset o - pad along axis a is on the grid
    inside = [[(x.coords[:, a] >= pad - o) & (x.coords[:, a] < r + pad - o) for o in range(kernel_size)]
              for a in (1, 2, 3)]
    nbr = torch.empty((len(x), kernel_size ** 3), dtype=torch.int32)
    for v, (i, j, k) in enumerate(kernel_offsets(kernel_size).tolist()):
        qk = (x.keys() + (((i - pad) * r + j - pad) * r + k - pad)).clamp_(0, len(table) - 1)
        nbr[:, v] = torch.where(inside[0][i] & inside[1][j] & inside[2][k], table[qk], -1)
    return KernelMap(nbr, len(x), symmetric=True)


def _check_structure(coords: torch.Tensor, feats: torch.Tensor, resolution: int, order: str = "sorted") -> None:
    """``order``: "sorted" by key, "grouped" (each batch element's rows together, in batch order) or "any"."""
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"SparseTensor: coords must be (N, 4) [batch, i, j, k], got shape {tuple(coords.shape)}")
    if coords.dtype != torch.int32:
        raise ValueError(f"SparseTensor: coords must be int32, got {coords.dtype}")
    if coords.shape[0] == 0:
        raise ValueError("SparseTensor: empty structure (no active voxels)")
    if feats.ndim != 2 or feats.shape[0] != coords.shape[0]:
        raise ValueError(f"SparseTensor: feats must be (N={coords.shape[0]}, C), got shape {tuple(feats.shape)}")
    lo, hi = int(coords[:, 1:].min()), int(coords[:, 1:].max())
    if lo < 0 or hi >= resolution or int(coords[:, 0].min()) < 0:
        raise ValueError(f"SparseTensor: coordinates out of range [0, {resolution}): min {lo}, max {hi}")
    keys = coord_keys(coords, resolution)
    step = keys[1:] - keys[:-1]
    if order == "sorted" and bool((step < 0).any()):
        raise ValueError("SparseTensor: coords are not sorted by key (use SparseTensor.from_unsorted)")
    if order == "grouped" and bool((coords[1:, 0] < coords[:-1, 0]).any()):
        raise ValueError("SparseTensor: the rows of each batch element must be together and in batch order")
    dup = (step == 0) if order == "sorted" else (torch.sort(keys).values.diff() == 0)
    if bool(dup.any()):
        raise ValueError(f"SparseTensor: {int(dup.sum())} duplicated coordinates")
