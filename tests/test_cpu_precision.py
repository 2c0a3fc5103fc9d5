"""bfloat16 linear layers, float32 attention: the DiTs' CPU training precision (TrainConfig.cpu_dit_precision)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import model.ssa
from kernels.sparse_conv import gather_gemm
from model.cpu_precision import cpu_autocast, float32_attention
from model.dit import DiTConfig, SparseDiT
from model.flow import TimestepSampler
from model.sparse import SparseTensor
from model.structure import StructureDiT, structure_dit_config
from pipeline.config import ConfigError
from pipeline.train.config import TrainConfig
from pipeline.train.tasks import DenseFlowObjective, FlowObjective, cpu_dit_bf16
from test_dit import _random_init


@pytest.fixture
def spy(monkeypatch):
    """The dtypes every scaled_dot_product_attention and every nn.Linear output saw."""
    seen = {"attention": [], "linear": []}
    sdpa = F.scaled_dot_product_attention

    def attention(q, k, v, *args, **kwargs):
        seen["attention"].append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    ssa = model.ssa.spatial_sparse_attention  # the SS-DiT's SSA (its CPU reference has no SDPA call)

    def sparse_attention(q, k, v, *args, **kwargs):
        seen["attention"].append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return ssa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(model.ssa, "spatial_sparse_attention", sparse_attention)
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: seen["linear"].append(out.dtype) if isinstance(mod, nn.Linear) else None)
    yield seen
    handle.remove()


def test_float32_attention_leaves_autocast_only_under_it():
    @float32_attention
    def f(a, b, scale=None):
        return a.dtype, b, scale.dtype, torch.is_autocast_enabled("cpu")

    half = torch.ones(2, dtype=torch.bfloat16)
    assert f(half, 3, scale=half) == (torch.bfloat16, 3, torch.bfloat16, False)  # outside autocast: untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f(half, 3, scale=half) == (torch.float32, 3, torch.float32, False)
        assert torch.is_autocast_enabled("cpu")  # restored after the call


def test_cpu_autocast_only_on_the_cpu():
    with cpu_autocast(True, "cpu"):
        assert torch.is_autocast_enabled("cpu")
    with cpu_autocast(False, "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with cpu_autocast(True, torch.device("meta")):
        assert not torch.is_autocast_enabled("cpu")


def _objective_runs(objective, inputs, spy):
    """(loss, gradients, attention dtypes, linear output dtypes) in float32 and then with bfloat16 linears."""
    runs = []
    for bf16 in (False, True):
        objective.cpu_bf16 = bf16
        objective.zero_grad()
        torch.manual_seed(3)  # the same t and noise
        loss, _ = objective(*inputs)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in objective.parameters() if p.grad is not None],
                     set(spy["attention"]), set(spy["linear"])))
        spy["attention"].clear(), spy["linear"].clear()
    return runs


def _check(runs):
    (l32, g32, att32, lin32), (l16, g16, att16, lin16) = runs
    assert lin32 == {torch.float32} and lin16 == {torch.bfloat16}  # every linear layer in bfloat16
    # every attention call in float32, autocast off, in both runs
    assert att32 == att16 == {(torch.float32, torch.float32, torch.float32, False)}
    assert l16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g16)
    assert l16 != l32 and torch.isclose(l16, l32, rtol=2e-2)  # bfloat16 rounding, nothing more
    flat32, flat16 = torch.cat([g.flatten() for g in g32]), torch.cat([g.flatten() for g in g16])
    assert len(g16) == len(g32) and F.cosine_similarity(flat32, flat16, dim=0) > 0.99


def test_structure_dit_objective_bf16_linears_float32_attention(spy):
    cfg = structure_dit_config("debug", cond_dim=32)
    objective = DenseFlowObjective(_random_init(StructureDiT(cfg)), TimestepSampler())
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(2, 8, 16, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    _check(_objective_runs(objective, (x0, cond), spy))


@pytest.mark.parametrize("attention", ["ssa", "full"])
def test_sparse_dit_objective_bf16_linears_float32_attention(spy, attention):
    cfg = DiTConfig.named("debug", attention=attention)
    objective = FlowObjective(_random_init(SparseDiT(cfg)), TimestepSampler())
    g = torch.Generator().manual_seed(0)
    cells = [torch.randperm(16 ** 3, generator=g)[:n] for n in (40, 25)]
    coords = [torch.stack([c // 256, c // 16 % 16, c % 16], 1) for c in cells]
    x0 = SparseTensor.from_samples(coords, [torch.randn(len(c), cfg.in_channels, generator=g) for c in cells],
                                   ordered=False)
    _check(_objective_runs(objective, (x0, torch.randn(2, 5, cfg.cond_dim, generator=g)), spy))


@pytest.mark.parametrize("isa", ["amx_bf16", "avx512_bf16", ""])
def test_cpu_dit_precision_auto_asks_this_cpu(isa, monkeypatch):
    monkeypatch.setattr(gather_gemm, "cpu_bf16_gemm", lambda: isa)
    assert cpu_dit_bf16(TrainConfig(network="dit", cpu_dit_precision="auto")) is bool(isa)
    assert cpu_dit_bf16(TrainConfig(network="dit", cpu_dit_precision="bf16"))
    assert not cpu_dit_bf16(TrainConfig(network="dit"))  # fp32 by default
    with pytest.raises(ValueError, match="cpu_dit_precision.*'fp16'"):
        gather_gemm.gemm_dtype("fp16", "cpu_dit_precision")
    with pytest.raises(ConfigError, match="cpu_dit_precision: 'fp16' is not one of fp32, bf16, auto"):
        TrainConfig(network="dit", cpu_dit_precision="fp16").validate()
