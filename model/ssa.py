"""Spatial Sparse Attention layer (Direct3D-S2 Sec. 3.3) as the released SS-DiT computes it.

Queries, keys and values come from bias-free projections (32 query heads, 2 key/value heads, head
dim 32 in the paper's SS-DiT). Keys (plus a learned intra-block position) and values are compressed
per m_cmp³ block (m_cmp = 4) by a learned block each: GroupNorm, SiLU, pool, two 3³ sparse
convs with a GroupNorm and SiLU between, plus the pooled input (the pool divides each block's sum by
its token count plus one, as the release's does). A gate Linear(dim, 3) shared by all
heads, through a sigmoid, mixes the compression, selection and window outputs before the output
projection. ``attention="full"`` swaps the three branches for SDPA over each shape (our baseline).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.sparse_conv import coord_keys
from kernels.ssa import SSAStructure, block_order, spatial_sparse_attention
from model.configs import strict_from_dict
from model.cpu_precision import float32_attention
from model.sparse import SparseConv3d, SparseGroupNorm, SparseLinear, SparseSiLU, SparseTensor, run_layers


@dataclass
class SSAConfig:
    dim: int = 1024
    num_heads: int = 32
    num_kv_heads: int = 2
    head_dim: int = 32
    cmp_block: int = 4  # m_cmp
    slc_block: int = 8  # m_slc
    top_k: int = 8
    window: int = 8
    window_shift: int = 4  # the shift of shifted layers
    # learned compression of keys and values: "v2" (the released default, above) or "v1" (1³ conv, SiLU, pool)
    compression: str = "v2"
    norm_groups: int = 32  # GroupNorm groups of the v2 compressor
    # block-sorted queries sharing one block selection: 1 = per query, as the paper and the release.
    # 64 runs the whole SSA about 2x faster forward and 1.3x backward at 131k tokens and changes the output
    q_tile: int = 1
    attention: str = "sparse"  # "sparse" (SSA) or "full" (PyTorch SDPA over each shape)
    backend: str = "auto"  # "triton", "torch" (reference) or "auto" (triton on CUDA, torch elsewhere)

    def __post_init__(self):
        if self.attention not in ("sparse", "full"):
            raise ValueError(f"SSAConfig.attention must be 'sparse' or 'full', got {self.attention!r}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"SSAConfig.backend must be 'auto', 'triton' or 'torch', got {self.backend!r}")
        if self.compression not in ("v1", "v2"):
            raise ValueError(f"SSAConfig.compression must be 'v1' or 'v2', got {self.compression!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"SSAConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.slc_block % self.cmp_block:
            raise ValueError(f"SSAConfig.slc_block ({self.slc_block}) must be a multiple of cmp_block ({self.cmp_block})")
        if self.compression == "v2" and (self.num_kv_heads * self.head_dim) % self.norm_groups:
            raise ValueError(f"SSAConfig: key/value width {self.num_kv_heads * self.head_dim} is not a multiple of "
                             f"norm_groups ({self.norm_groups})")

    @classmethod
    def from_dict(cls, d: dict) -> "SSAConfig":
        return strict_from_dict(cls, d)


@float32_attention  # float32 under CPU bfloat16 autocast (model.cpu_precision); the kernels' own rules elsewhere
def _spatial_sparse_attention(*args, **kwargs):
    return spatial_sparse_attention(*args, **kwargs)


def _backend(cfg: SSAConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    # Triton's interpreter is chosen when the kernels are imported, so a CPU run asks for it explicitly
    return "triton" if device.type == "cuda" else "torch"


@float32_attention  # float32 under CPU bfloat16 autocast (model.cpu_precision)
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q, cu_kv) -> torch.Tensor:
    """Attention of each shape's queries to that shape's keys only.

    q (Nq, Hq, D), k/v (Nk, Hkv, D) with Hq a multiple of Hkv (grouped-query attention); cu_q / cu_kv the
    row offsets, as tensors or as lists of ints (a caller that runs many layers reads them to the host once).
    Equal lengths run as one batched SDPA call; ragged ones loop over shapes (no padding, no mask).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    cq = cu_q.tolist() if isinstance(cu_q, torch.Tensor) else cu_q
    ck = cu_kv.tolist() if isinstance(cu_kv, torch.Tensor) else cu_kv
    lq = {b - a for a, b in zip(cq[:-1], cq[1:])}
    lk = {b - a for a, b in zip(ck[:-1], ck[1:])}
    b = len(cq) - 1
    if len(lq) == 1 and len(lk) == 1:
        nq, nk = lq.pop(), lk.pop()
        qb = q.reshape(b, nq, *q.shape[1:]).transpose(1, 2)
        kb = k.reshape(b, nk, *k.shape[1:]).transpose(1, 2)
        vb = v.reshape(b, nk, *v.shape[1:]).transpose(1, 2)
        return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(q.shape)
    out = []
    for i in range(b):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)[None]
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        out.append(F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1))
    return torch.cat(out, dim=0)


def ssa_structure(x: SparseTensor, cfg: SSAConfig):
    """(block order permutation, its inverse, SSAStructure) of ``x``'s tokens, kept in ``x.cache``: every
    tensor that shares its voxels (the layers of one forward, the steps of a sampler) builds it once."""
    key = ("ssa", cfg.cmp_block, cfg.slc_block, cfg.window, cfg.window_shift)
    if key not in x.cache:
        coords, cu = x.coords[:, 1:], x.cu_seqlens
        perm = block_order(coords, cu, cfg.cmp_block, cfg.slc_block)
        st = SSAStructure(coords[perm], cu, cfg.cmp_block, cfg.slc_block, cfg.window, cfg.window_shift)
        x.cache[key] = (perm, torch.argsort(perm), st)
    return x.cache[key]


class BlockGrid:
    """The tokens of an SSAStructure as SparseTensors: fine (token order) and m_cmp-coarse (one voxel per
    compression block, sorted by key as SparseTensor requires), with the maps between them.

    Built once per structure and shared by every compressor of every layer, so the coarse grid's
    kernel map is built once per forward."""

    def __init__(self, st: SSAStructure):
        m = st.cmp_block
        shape = st.shape_of_token.to(torch.int32)[:, None]
        coords = st._coords.to(torch.int32)
        self.fine_coords = torch.cat([shape, coords], 1)
        first = st.cmp_offsets[:-1]
        coarse = torch.cat([shape[first], torch.div(coords[first], m, rounding_mode="floor")], 1)
        res = int(coarse[:, 1:].max()) + 1
        self.fine_resolution = int(coords.max()) + 1
        order = torch.argsort(coord_keys(coarse, res))
        self.rank = torch.argsort(order)  # key-order row of each compression block (structure order)
        self.token_row = self.rank[st.cmp_of_token]  # key-order row of each token's compression block
        # the release pools with scatter_reduce("mean") onto zeros, which counts that zero too: sum / (n + 1)
        self.divisor = torch.bincount(self.token_row, minlength=st.n_cmp)[:, None] + 1
        self.coarse_coords = coarse[order].contiguous()
        self.resolution, self.batch_size, self.cache = res, st.n_shapes, {}
        self.fine_cache = {}  # the fine grid's layout, shared by every compressor's norms (no host read each)

    def fine(self, feats: torch.Tensor) -> SparseTensor:
        # token (block) order is not key order: fit for per-token and per-shape layers only, not convs
        return SparseTensor(self.fine_coords, feats, self.fine_resolution, self.batch_size, self.fine_cache,
                            check=False, ordered=False)

    def pool(self, x: SparseTensor) -> SparseTensor:
        """Each compression block's tokens pooled as the release pools them (sum / (n + 1)), as a coarse
        SparseTensor in key order."""
        f = x.feats.float() if x.dtype in (torch.float16, torch.bfloat16) else x.feats
        total = f.new_zeros(len(self.coarse_coords), f.shape[1]).index_add(0, self.token_row, f)
        return SparseTensor(self.coarse_coords, (total / self.divisor).to(x.dtype), self.resolution,
                            self.batch_size, self.cache, check=False)


class BlockCompressor(nn.Module):
    """One token per m_cmp³ block from its tokens' features (the released SparseDownBlock3d).

    v2: h = GroupNorm → SiLU → pool → 3³ conv → GroupNorm → SiLU → 3³ conv, plus the pool of the
    input. v1: 1³ conv → SiLU → pool. Statistics of every GroupNorm are per shape."""

    def __init__(self, channels: int, version: str = "v2", groups: int = 32):
        super().__init__()
        self.version = version
        if version == "v2":
            self.act_layers = nn.Sequential(SparseGroupNorm(groups, channels), SparseSiLU())
            self.out_layers = nn.Sequential(SparseConv3d(channels, channels, 3), SparseGroupNorm(groups, channels),
                                            SparseSiLU(), SparseConv3d(channels, channels, 3))
        else:
            self.act_layers = nn.Sequential(SparseLinear(channels, channels), SparseSiLU())

    def forward(self, feats: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
        """feats (N, C) in token order -> (n_cmp, C) in the coarse grid's key order."""
        x = grid.fine(feats)
        h = grid.pool(run_layers(self.act_layers, x))
        if self.version == "v1":
            return h.feats
        return run_layers(self.out_layers, h).feats + grid.pool(x).feats


class SpatialSparseAttention(nn.Module):
    """SSA over the tokens of a packed batch of sparse shapes; ``shifted`` moves the windows by window_shift.

    State-dict keys are the released layer's (proj_q/k/v/o, compression_key/value, intra_block_pe,
    gate.0), except each sparse conv's ``weight`` (the release's ``conv.kernel``, model/dit.py converts)."""

    def __init__(self, cfg: SSAConfig, shifted: bool = False):
        super().__init__()
        self.cfg, self.shifted = cfg, bool(shifted)
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.proj_q = nn.Linear(cfg.dim, hq * d, bias=False)
        self.proj_k = nn.Linear(cfg.dim, hkv * d, bias=False)
        self.proj_v = nn.Linear(cfg.dim, hkv * d, bias=False)
        self.proj_o = nn.Linear(hq * d, cfg.dim, bias=False)
        if cfg.attention == "sparse":  # full attention has no use for these (and no unused parameters)
            m = cfg.cmp_block
            self.compression_key = BlockCompressor(hkv * d, cfg.compression, cfg.norm_groups)
            self.compression_value = BlockCompressor(hkv * d, cfg.compression, cfg.norm_groups)
            self.intra_block_pe = nn.Parameter(torch.zeros(m, m, m, hkv * d))  # added to keys before compression
            self.gate = nn.Sequential(nn.Linear(cfg.dim, 3, bias=False), nn.Sigmoid())  # shared by all heads

    @classmethod
    def from_dit_config(cls, cfg, layer: int) -> "SpatialSparseAttention":
        """The SS-DiT's self-attention of block ``layer`` (model/dit.py DiTConfig)."""
        return cls(cfg.ssa_config(), cfg.layer_shifted(layer))

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Tokens of a batch of shapes (ordered or packed, features (N, dim)) → the same tokens, (N, dim)."""
        if self.cfg.attention == "full":
            return x.replace(self.full_attention(x.feats, x.cu_seqlens))
        perm, inv, st = ssa_structure(x, self.cfg)
        return x.replace(self.forward_sorted(x.feats[perm], st)[inv])

    def forward_sorted(self, feats: torch.Tensor, st: SSAStructure) -> torch.Tensor:
        """feats (N, dim) already in ``st``'s block order → (N, dim) in the same order."""
        cfg = self.cfg
        if feats.ndim != 2 or feats.shape[1] != cfg.dim:
            raise ValueError(f"features must be (N, {cfg.dim}), got {tuple(feats.shape)}")
        if feats.shape[0] != st.n_tokens:
            raise ValueError(f"features have {feats.shape[0]} tokens but the structure has {st.n_tokens}")
        if cfg.attention == "full":
            return self.full_attention(feats, st.cu_seqlens)
        if (st.cmp_block, st.slc_block, st.window, st.window_shift) != (
                cfg.cmp_block, cfg.slc_block, cfg.window, cfg.window_shift):
            raise ValueError("structure block sizes differ from the layer's SSAConfig")
        n = feats.shape[0]
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = self.proj_q(feats).view(n, hq, d)
        k = self.proj_k(feats)
        v = self.proj_v(feats)
        k_cmp, v_cmp = self.compress(k, v, st)
        gates = self.gate(feats)[:, None, :].expand(n, hq, 3)
        o = _spatial_sparse_attention(q, k.view(n, hkv, d), v.view(n, hkv, d), k_cmp, v_cmp, gates, st,
                                     top_k=cfg.top_k, q_tile=cfg.q_tile, shifted=self.shifted,
                                     backend=_backend(cfg, feats.device))
        return self.proj_o(o.reshape(n, hq * d))

    def compress(self, k: torch.Tensor, v: torch.Tensor, st: SSAStructure):
        """k, v (N, Hkv·D) in block order → k_cmp, v_cmp (n_cmp, Hkv, D) in the structure's compression-block order."""
        grid = st.cached("block_grid", lambda: BlockGrid(st))
        # an embedding lookup: its backward sums duplicate rows by segments, where indexing's backward
        # (index_put with accumulate) serialises the ~N / m_cmp³ duplicates of each of the m_cmp³ rows
        pe = F.embedding(st.intra_cmp, self.intra_block_pe.reshape(-1, k.shape[1]).to(k.dtype))
        k_cmp = self.compression_key(k + pe, grid)[grid.rank]
        v_cmp = self.compression_value(v, grid)[grid.rank]
        shape = (st.n_cmp, self.cfg.num_kv_heads, self.cfg.head_dim)
        return k_cmp.reshape(shape), v_cmp.reshape(shape)

    def full_attention(self, feats: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """SDPA of every token over its shape's tokens through the same projections (any token order)."""
        cfg = self.cfg
        n = feats.shape[0]
        q = self.proj_q(feats).view(n, cfg.num_heads, cfg.head_dim)
        k = self.proj_k(feats).view(n, cfg.num_kv_heads, cfg.head_dim)
        v = self.proj_v(feats).view(n, cfg.num_kv_heads, cfg.head_dim)
        o = varlen_attention(q, k, v, cu_seqlens, cu_seqlens)
        return self.proj_o(o.reshape(n, -1))
