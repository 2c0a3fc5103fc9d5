"""PyTorch references of the released SSA Triton ops, for runs where those kernels cannot run.

The release's score and selection kernels accept only float16/bfloat16 and its block scoring
allocates on "cuda" by name. For float32 runs (and any CPU run) the parity harness swaps in:
- ``attention_score``: the compression branch's block score, score[h_kv, i, j] =
  sum over the query heads h of KV group h_kv of exp(scale·q_h[i]·k_c[j] − lse_h[i]) (the kernel's
  exp2 form with lse in log2 units), over each batch's compressed keys, zero past a batch's keys;
- ``selection_attention``: for each query and KV group, attention over the tokens of the first
  ``real_topk`` selected blocks, block j of a batch being tokens
  [cu_block_include_tokens[start + j], cu_block_include_tokens[start + j + 1]) as the kernel reads them;
- a ``torch`` proxy for the scoring module that maps device="cuda" to the run's device.
These are written from the kernels' definitions; they share no code with them.
"""
from __future__ import annotations

import math
import types

import torch

__all__ = ["attention_score", "selection_attention", "device_redirect"]

_CHUNK = 2048


def attention_score(q, k, lse_log2, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale):
    total_q, h_q, d = q.shape
    h_kv = k.shape[1]
    group = h_q // h_kv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    score = torch.zeros(h_kv, total_q, max_seqlen_k, dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lse = lse_log2.float() * math.log(2.0)          # natural-log units
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].float()             # [l, H, D]
        kb = k[ck[b]:ck[b + 1]].float()             # [s, H_kv, D]
        for hk in range(h_kv):
            acc = torch.zeros(qb.shape[0], kb.shape[0], dtype=torch.float32, device=q.device)
            for g in range(group):
                h = hk * group + g
                s = qb[:, h] @ kb[:, hk].T * scale
                acc += torch.exp(s - lse[h, cq[b]:cq[b + 1], None])
            score[hk, cq[b]:cq[b + 1], :kb.shape[0]] = acc
    return score


def selection_attention(q, k, v, block_topk, cu_seqblocks, cu_block_include_tokens, block_size, cu_seqlens,
                        softmax_scale=None):
    total, h_q, d = q.shape
    h_kv = k.shape[1]
    group = h_q // h_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(total, h_q, v.shape[-1], dtype=torch.float32, device=q.device)
    cs, cbs, cbt = cu_seqlens.tolist(), cu_seqblocks.long().tolist(), cu_block_include_tokens.long()
    for b in range(len(cs) - 1):
        start, end = cs[b], cs[b + 1]
        block_start, block_len = cbs[b], cbs[b + 1] - cbs[b]
        bounds = cbt[block_start:block_start + block_len + 1]
        tokens = torch.arange(start, end, device=q.device)
        token_block = torch.searchsorted(bounds, tokens, right=True) - 1      # block of each key token
        token_block = torch.where((tokens >= bounds[0]) & (tokens < bounds[-1]), token_block,
                                  torch.full_like(token_block, -2))
        for hk in range(h_kv):
            topk = block_topk[hk, start:end].long()                            # [l, K]
            valid = (topk >= 0) & (topk < block_len)
            real = valid.sum(1, keepdim=True)
            first = torch.arange(topk.shape[1], device=q.device)[None, :] < real
            chosen = torch.where(first, topk, torch.full_like(topk, -3))
            kb = k[start:end, hk].float()
            vb = v[start:end, hk].float()
            chunk = max(16, min(_CHUNK, (1 << 27) // max(1, group * (end - start) * max(1, topk.shape[1] // 4))))
            for i0 in range(0, end - start, chunk):
                i1 = min(i0 + chunk, end - start)
                mask = (chosen[i0:i1, :, None] == token_block[None, None, :]).any(1)   # [l, s]
                qg = q[start + i0:start + i1, hk * group:(hk + 1) * group].float()       # [l, G, D]
                s = torch.einsum("lgd,sd->gls", qg, kb) * scale
                s = s.masked_fill(~mask[None], float("-inf"))
                p = torch.softmax(s, dim=-1)
                out[start + i0:start + i1, hk * group:(hk + 1) * group] = torch.einsum("gls,sd->lgd", p, vb)
    return out.to(q.dtype)


class _TorchOnDevice(types.ModuleType):
    """torch, except that device="cuda" means the given device (the release hard-codes it)."""

    def __init__(self, device):
        super().__init__("torch")
        self._device = torch.device(device)

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in ("zeros", "ones", "full", "empty", "arange", "tensor"):
            def call(*args, _f=value, **kwargs):
                if kwargs.get("device") in ("cuda", torch.device("cuda")):
                    kwargs["device"] = self._device
                return _f(*args, **kwargs)
            return call
        if name == "histc":
            def histc(input, *args, _f=value, **kwargs):
                # integer histograms are exact in float32 at these sizes; CPU histc needs a float input
                return _f(input.float() if not input.is_floating_point() else input, *args, **kwargs)
            return histc
        return value


def device_redirect(device) -> types.ModuleType:
    return _TorchOnDevice(device)
