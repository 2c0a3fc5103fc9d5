"""A PyTorch stand-in for the flash-attn 2 functions the released Direct3D-S2 code calls.

Conventions kept from flash-attn 2.x:
- dense calls take [B, L, H, D] (packed: qkv [B, L, 3, H, D], kv [B, S, 2, H_kv, D]) and return [B, L, H, D];
- varlen calls take [T, H, D] with int32 cu_seqlens of length batch+1 and return [T, H, D];
- grouped-query attention: query head h reads key/value head h // (H / H_kv);
- softmax_scale defaults to 1/sqrt(D); with return_attn_probs=True the result is
  (out, softmax_lse, S_dmask) where softmax_lse is the natural-log sum of exp(scale·q·k), float32,
  [B, H, L] for dense calls and [H, T] for varlen calls; S_dmask is an empty tensor (no dropout).
Scores, softmax and the value sum run in float32 (flash-attn accumulates in float32) and the output
is cast back to the query's dtype; queries are processed in chunks to bound memory.
"""
from __future__ import annotations

import math
import types

import torch

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "build_module"]

_CHUNK = 4096


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """q [L, H, D], k/v [S, H_kv, D] -> out [L, H, Dv] (float32), lse [H, L] (float32)."""
    L, H, _ = q.shape
    S, H_kv, _ = k.shape
    if H % H_kv:
        raise ValueError(f"flash_attn stand-in: {H} query heads are not a multiple of {H_kv} key heads")
    group = H // H_kv
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)   # [H, S, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)   # [H, S, Dv]
    outs, lses = [], []
    for start in range(0, L, _CHUNK):
        qf = q[start:start + _CHUNK].float().transpose(0, 1)         # [H, l, D]
        s = torch.matmul(qf, kf.transpose(1, 2)) * scale             # [H, l, S]
        if causal:
            # flash-attn 2.1+: causal mask aligned to the bottom-right corner
            rows = torch.arange(start, start + qf.shape[1], device=q.device)[:, None]
            cols = torch.arange(S, device=q.device)[None, :]
            s = s.masked_fill(cols > rows + (S - L), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                             # [H, l]
        p = torch.exp(s - lse[..., None])
        outs.append(torch.matmul(p, vf).transpose(0, 1))             # [l, H, Dv]
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def _scale(q, softmax_scale):
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, **_):
    if dropout_p:
        raise NotImplementedError("flash_attn stand-in: dropout")
    scale = _scale(q, softmax_scale)
    outs, lses = [], []
    for b in range(q.shape[0]):
        o, lse = _attend(q[b], k[b], v[b], scale, causal)
        outs.append(o)
        lses.append(lse)
    out = torch.stack(outs).to(q.dtype)
    if return_attn_probs:
        return out, torch.stack(lses), torch.empty(0, device=q.device)
    return out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, **kw)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
    k, v = kv.unbind(dim=2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, **kw)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False,
                           block_table=None, **_):
    if dropout_p:
        raise NotImplementedError("flash_attn stand-in: dropout")
    scale = _scale(q, softmax_scale)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    seqs = [b for b in range(len(cq) - 1) if cq[b + 1] > cq[b]]
    if len(seqs) > 16 and not causal:
        _attend_many(q, k, v, cq, ck, seqs, scale, out, lse)
    else:
        for b in seqs:
            o, l = _attend(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], scale, causal)
            out[cq[b]:cq[b + 1]] = o
            lse[:, cq[b]:cq[b + 1]] = l
    out = out.to(q.dtype)
    if return_attn_probs:
        return out, lse, torch.empty(0, device=q.device)
    return out


def _attend_many(q, k, v, cq, ck, seqs, scale, out, lse, budget=1 << 27):
    """Many short sequences (attention windows) at once: padded to the longest, keys masked, in groups
    whose score tensor stays under ``budget`` elements. Same arithmetic as _attend, per sequence."""
    h, h_kv = q.shape[1], k.shape[1]
    group = h // h_kv
    lq = max(cq[b + 1] - cq[b] for b in seqs)
    lk = max(ck[b + 1] - ck[b] for b in seqs)
    per = max(1, budget // (h * lq * lk))
    dev = q.device
    for g0 in range(0, len(seqs), per):
        batch = seqs[g0:g0 + per]
        qs = torch.tensor([cq[b] for b in batch], device=dev)
        nq = torch.tensor([cq[b + 1] - cq[b] for b in batch], device=dev)
        ks = torch.tensor([ck[b] for b in batch], device=dev)
        nk = torch.tensor([ck[b + 1] - ck[b] for b in batch], device=dev)
        iq = qs[:, None] + torch.arange(lq, device=dev)[None]          # [n, lq]
        ik = ks[:, None] + torch.arange(lk, device=dev)[None]          # [n, lk]
        vq = torch.arange(lq, device=dev)[None] < nq[:, None]
        vk = torch.arange(lk, device=dev)[None] < nk[:, None]
        qq = q[iq.clamp(max=q.shape[0] - 1)].float()                   # [n, lq, H, D]
        kk = k[ik.clamp(max=k.shape[0] - 1)].float().repeat_interleave(group, dim=2)
        vv = v[ik.clamp(max=k.shape[0] - 1)].float().repeat_interleave(group, dim=2)
        s = torch.einsum("nqhd,nkhd->nhqk", qq, kk) * scale
        s = s.masked_fill(~vk[:, None, None, :], float("-inf"))
        l = torch.logsumexp(s, dim=-1)                                 # [n, H, lq]
        o = torch.einsum("nhqk,nkhd->nqhd", torch.exp(s - l[..., None]), vv)
        rows = iq[vq]
        out[rows] = o[vq]
        lse[:, rows] = l.permute(1, 0, 2)[:, vq]


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, **kw):
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, **kw)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False, **kw):
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, **kw)


def build_module() -> types.ModuleType:
    mod = types.ModuleType("flash_attn")
    mod.__version__ = "2.7.0+parity-standin"
    for name in ("flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
                 "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"):
        setattr(mod, name, globals()[name])
    return mod
