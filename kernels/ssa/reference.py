"""Plain PyTorch Spatial Sparse Attention, written to be read against the paper (float64-capable).

Direct3D-S2 Sec. 3.3: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, where
  o_cmp attends to each m_cmp³ block pooled to one key/value token,
  o_slc attends to the tokens of the top-k m_slc³ blocks ranked by the compression
        probabilities summed over the query heads of a KV group (and the blocks'
        compression blocks),
  o_win attends to the tokens of the query's 8³ window (shifted by 4 on odd layers).
Every loop here runs over shapes and builds a dense mask: slow, and obviously right.
"""
from __future__ import annotations

import torch

from .structure import SSAStructure


def _attend(q, k, v, mask):
    """q (n, Hq, D), k/v (m, Hkv, D), mask (Hkv or 1, n, m) → out (n, Hq, D), lse (n, Hq), probs (n, Hq, m)."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    kk = k.repeat_interleave(g, dim=1)
    vv = v.repeat_interleave(g, dim=1)
    s = torch.einsum("nhd,mhd->hnm", q, kk) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask.repeat_interleave(g, dim=0) if mask.shape[0] > 1 else ~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("hnm,mhd->nhd", p, vv), lse.transpose(0, 1), p.permute(1, 0, 2)


def compression_attention_ref(q, k_cmp, v_cmp, st: SSAStructure):
    """Each query over its shape's pooled block tokens. Returns out, lse, and the probabilities per shape."""
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[:2], dtype=q.dtype, device=q.device)
    probs = []
    for b in range(st.n_shapes):
        a, e = st.cu_seqlens[b].item(), st.cu_seqlens[b + 1].item()
        ca, ce = st.cmp_shape_offsets[b].item(), st.cmp_shape_offsets[b + 1].item()
        mask = torch.ones(1, e - a, ce - ca, dtype=torch.bool, device=q.device)
        out[a:e], lse[a:e], p = _attend(q[a:e], k_cmp[ca:ce], v_cmp[ca:ce], mask)
        probs.append(p)
    return out, lse, probs


def select_blocks_ref(probs, st: SSAStructure, n_kv_heads: int, top_k: int, q_tile: int = 1):
    """Top-k selection blocks per query tile and kv head: (n_tiles, Hkv, top_k) global block ids, -1 = none.

    Score of a block = compression probabilities summed over the G query heads of the
    KV group, over the compression blocks inside the selection block, and over the
    tokens of the query tile (q_tile = 1: per query, as in the paper)."""
    rows = []
    for b, p in enumerate(probs):
        n, hq, nc = p.shape
        ca = st.cmp_shape_offsets[b].item()
        sa, se = st.slc_shape_offsets[b].item(), st.slc_shape_offsets[b + 1].item()
        per_group = p.reshape(n, n_kv_heads, hq // n_kv_heads, nc).sum(2)  # (n, Hkv, nc)
        per_block = torch.zeros(n, n_kv_heads, se - sa, dtype=p.dtype, device=p.device)
        per_block.index_add_(2, st.cmp_to_slc_local[ca:ca + nc].long(), per_group)
        tile = torch.arange(n, device=p.device) // q_tile
        per_tile = torch.zeros(int(tile[-1]) + 1, n_kv_heads, se - sa, dtype=p.dtype, device=p.device)
        per_tile.index_add_(0, tile, per_block)
        kk = min(top_k, se - sa)
        idx = per_tile.topk(kk, dim=-1).indices + sa
        pad = torch.full((idx.shape[0], n_kv_heads, top_k - kk), -1, dtype=idx.dtype, device=idx.device)
        rows.append(torch.cat([idx, pad], dim=-1))
    return torch.cat(rows)


def selection_attention_ref(q, k, v, st: SSAStructure, selected, q_tile: int = 1):
    """Each query over the tokens of the blocks selected for its tile and kv head."""
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[:2], dtype=q.dtype, device=q.device)
    tile0 = 0
    for b in range(st.n_shapes):
        a, e = st.cu_seqlens[b].item(), st.cu_seqlens[b + 1].item()
        n = e - a
        n_tiles = (n + q_tile - 1) // q_tile
        sel = selected[tile0:tile0 + n_tiles]  # (tiles, Hkv, k)
        tile0 += n_tiles
        key_block = st.slc_of_token[a:e]  # (n,)
        chosen = (sel[:, :, :, None] == key_block[None, None, None, :]).any(2)  # (tiles, Hkv, n)
        mask = chosen[torch.arange(n, device=q.device) // q_tile].permute(1, 0, 2)  # (Hkv, n, n)
        out[a:e], lse[a:e], _ = _attend(q[a:e], k[a:e], v[a:e], mask)
    return out, lse


def window_attention_ref(q, k, v, st: SSAStructure, shifted: bool):
    """Each query over the tokens present in its 8³ window (origin moved by the shift on odd layers)."""
    win = st.window_ids(shifted)
    out = torch.zeros_like(q)
    for b in range(st.n_shapes):
        a, e = st.cu_seqlens[b].item(), st.cu_seqlens[b + 1].item()
        mask = (win[a:e, None] == win[None, a:e])[None]
        out[a:e] = _attend(q[a:e], k[a:e], v[a:e], mask)[0]
    return out


def ssa_reference(q, k, v, k_cmp, v_cmp, gates, st: SSAStructure, top_k: int = 8, shifted: bool = False,
                  q_tile: int = 1, selected=None):
    """Whole SSA: gates (N, 3) or (N, Hq, 3) already through the sigmoid. Returns (out, selected blocks)."""
    if gates.ndim == 2:  # one gate per token and branch, shared by the heads (the release's layer)
        gates = gates[:, None, :]
    o_cmp, _, probs = compression_attention_ref(q, k_cmp, v_cmp, st)
    if selected is None:
        selected = select_blocks_ref([p.detach() for p in probs], st, k.shape[1], top_k, q_tile)
    o_slc, _ = selection_attention_ref(q, k, v, st, selected, q_tile)
    o_win = window_attention_ref(q, k, v, st, shifted)
    out = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
    return out, selected
