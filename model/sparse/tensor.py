"""SparseTensor: the one type every sparse layer takes and returns."""

from __future__ import annotations

import torch

from kernels.sparse_conv import KernelMap, build_kernel_map, coord_keys


class SparseTensor:
    """Features on the active voxels of a batch of grids.

    ``coords`` (N, 4) int32 [batch, i, j, k], sorted by key ((b·R + i)·R + j)·R + k
    and free of duplicates; ``feats`` (N, C); ``resolution`` R bounds i, j, k.
    ``cache`` holds kernel maps and pooled structures built for these
    coordinates; ``replace`` shares it, so a map is built once per structure
    and reused by every layer that runs on it.
    """

    def __init__(self, coords: torch.Tensor, feats: torch.Tensor, resolution: int,
                 batch_size: int | None = None, cache: dict | None = None, check: bool = True):
        if check:
            _check_structure(coords, feats, resolution)
        self.coords = coords
        self.feats = feats
        self.resolution = int(resolution)
        self.batch_size = int(coords[-1, 0].item()) + 1 if batch_size is None else int(batch_size)
        self.cache = {} if cache is None else cache

    @classmethod
    def from_unsorted(cls, coords: torch.Tensor, feats: torch.Tensor, resolution: int,
                      batch_size: int | None = None) -> "SparseTensor":
        """Sort rows by key first (coordinates still must be unique and in range)."""
        _check_structure(coords, feats, resolution, need_sorted=False)
        order = torch.argsort(coord_keys(coords, resolution))
        return cls(coords[order].contiguous(), feats[order], resolution, batch_size)

    @classmethod
    def from_samples(cls, coords: list[torch.Tensor], feats: list[torch.Tensor], resolution: int,
                     device: torch.device | str | None = None) -> "SparseTensor":
        """A batch of grids from each one's voxels (N_i, 3) and features (N_i, C) (or values (N_i,))."""
        if not coords or len(coords) != len(feats):
            raise ValueError(f"SparseTensor.from_samples: {len(coords)} coordinate and {len(feats)} feature sets")
        c = torch.cat([torch.cat([torch.full_like(ci[:, :1], b, dtype=torch.int32), ci.to(torch.int32)], 1)
                       for b, ci in enumerate(coords)])
        f = torch.cat([fi.reshape(len(fi), -1) for fi in feats])
        device = c.device if device is None else device
        return cls.from_unsorted(c.to(device), f.to(device), resolution, len(coords))

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

    def keys(self) -> torch.Tensor:
        if "keys" not in self.cache:
            self.cache["keys"] = coord_keys(self.coords, self.resolution)
        return self.cache["keys"]

    def replace(self, feats: torch.Tensor) -> "SparseTensor":
        """Same structure (and cached maps), new features."""
        if feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"SparseTensor.replace: {feats.shape[0]} feature rows for {self.coords.shape[0]} voxels")
        return SparseTensor(self.coords, feats, self.resolution, self.batch_size, self.cache, check=False)

    # -- kernel maps, cached by kind and stride ------------------------------
    def submanifold_map(self, kernel_size: int = 3) -> KernelMap:
        key = ("submanifold", kernel_size, 1)
        if key not in self.cache:
            self.cache[key] = build_kernel_map(self.coords, self.coords, self.resolution, kernel_size,
                                               stride=1, in_sorted=True)
        return self.cache[key]

    def coarse(self, stride: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates of the ×stride coarser grid covering these voxels, and each voxel's parent row."""
        key = ("coarse", stride)
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
                f"batch={self.batch_size}, dtype={self.dtype}, device={self.device})")


def _check_structure(coords: torch.Tensor, feats: torch.Tensor, resolution: int, need_sorted: bool = True) -> None:
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
    if need_sorted and bool((step < 0).any()):
        raise ValueError("SparseTensor: coords are not sorted by key (use SparseTensor.from_unsorted)")
    dup = (step == 0) if need_sorted else (torch.sort(keys).values.diff() == 0)
    if bool(dup.any()):
        raise ValueError(f"SparseTensor: {int(dup.sum())} duplicated coordinates")
