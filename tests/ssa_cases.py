"""Random ragged batches of sparse shapes for the SSA tests and the benchmark's correctness sweep."""
from __future__ import annotations

import torch

from kernels.ssa import SSAStructure, block_order


def random_shapes(sizes, grid: int = 20, seed: int = 0):
    """One shape per entry of ``sizes``: that many distinct random voxels in a grid³ box (sizes may be 1).

    Returns coords (N, 3) int32 and cu_seqlens (B+1), unsorted."""
    g = torch.Generator().manual_seed(seed)
    coords, cu = [], [0]
    for i, n in enumerate(sizes):
        side = min(grid, max(2, round(n ** (1 / 3)) + 1 + i % 3))
        while side ** 3 < n:
            side += 1
        pick = torch.randperm(side ** 3, generator=g)[:n]
        c = torch.stack([pick // side ** 2, (pick // side) % side, pick % side], 1)
        coords.append(c + torch.randint(0, 9, (1, 3), generator=g))  # offsets not aligned to blocks
        cu.append(cu[-1] + n)
    return torch.cat(coords).int(), torch.tensor(cu)


def shell_shapes(sizes, grid: int = 40, seed: int = 0):
    """One shape per entry of ``sizes``: the voxels nearest a random sphere of a grid³ box (a thick shell, so
    blocks are partly filled and a shape holds many of them, as on real surfaces). Unsorted coords, cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.arange(grid, dtype=torch.float32)
    c = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    coords, cu = [], [0]
    for n in sizes:
        centre = torch.rand(3, generator=g) * grid * 0.2 + grid * 0.4
        radius = float(torch.rand(1, generator=g)) * grid * 0.2 + grid * 0.15
        dist = ((c - centre).norm(dim=1) - radius).abs() + 0.5 * torch.rand(len(c), generator=g)
        coords.append(c[torch.argsort(dist)[:n]].int())
        cu.append(cu[-1] + n)
    return torch.cat(coords), torch.tensor(cu)


def random_batch(sizes, hq, hkv, d, cmp_block=4, slc_block=8, seed=0, device="cpu", dtype=torch.float32,
                 grid=20):
    """Sorted structure plus random q, k, v, pooled k_cmp/v_cmp and gates in float64 (cast by the caller)."""
    coords, cu = random_shapes(sizes, grid, seed)
    perm = block_order(coords, cu, cmp_block, slc_block)
    coords = coords[perm].to(device)
    st = SSAStructure(coords, cu.to(device), cmp_block, slc_block)
    g = torch.Generator().manual_seed(seed + 1)
    n = coords.shape[0]
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    return st, dict(q=mk(n, hq, d), k=mk(n, hkv, d), v=mk(n, hkv, d), k_cmp=mk(st.n_cmp, hkv, d),
                    v_cmp=mk(st.n_cmp, hkv, d), gates=torch.sigmoid(mk(n, hq, 3)))
