"""benchmarks/step_profile.py: kernels land in the right category and categories + idle time = wall time."""
import pytest
import torch

from benchmarks.step_profile import (CONV, GAPS, SSA, breakdown, categorize, profile_step, triton_kernel_names,
                                     union_length)


def test_our_triton_kernels_are_found_by_name():
    names = triton_kernel_names()
    assert {"_fwd_kernel", "_bwd_dq_kernel", "_score_kernel"} <= names["kernels.ssa"]
    assert names["kernels.sparse_conv"], "no sparse-conv kernel found"
    assert categorize("_fwd_kernel", names["kernels.ssa"], names["kernels.sparse_conv"]) == SSA
    conv = next(iter(names["kernels.sparse_conv"]))
    assert categorize(conv, names["kernels.ssa"], names["kernels.sparse_conv"]) == CONV


@pytest.mark.parametrize("name, cat", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM (linears)"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "GEMM (linears)"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdam>", "optimizer"),
    ("flash_fwd_kernel", "other attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "other attention"),
    ("void at::native::vectorized_layer_norm_kernel<c10::BFloat16, float>", "norms, modulation, elementwise"),
    ("aten::addmm", "GEMM (linears)"),
    # an elementwise kernel made from a lambda (autocast's casts, copies): not the optimizer
    ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)"
     "::{lambda(float)#1}, std::array<char*, 2ul> >(int, at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)"
     "::{lambda(float)#1}, std::array<char*, 2ul>)", "norms, modulation, elementwise"),
    ("some_unknown_kernel", "other kernels"),
])
def test_kernel_names_by_category(name, cat):
    assert categorize(name, set(), set()) == cat


def test_overlapping_streams_are_not_counted_twice():
    assert union_length([(0, 10), (5, 15), (20, 30)]) == 25
    assert union_length([]) == 0
    kernels = [("gemm_a", 0, 10), ("ncclAllReduce", 5, 15), ("vectorized_add", 20, 30)]
    cats, names = breakdown(kernels, wall_us=40)
    assert cats[GAPS] == pytest.approx(15)  # 40 - 25 busy
    assert sum(cats.values()) == pytest.approx(40)
    assert cats["communication"] == pytest.approx(10 * 25 / 30)  # overlap shared out in proportion
    assert names == {"gemm_a": 10, "ncclAllReduce": 10, "vectorized_add": 10}


def test_a_cpu_step_adds_up_to_its_wall_time():
    torch.manual_seed(0)
    lin, norm = torch.nn.Linear(256, 256), torch.nn.LayerNorm(256)
    x = torch.randn(512, 256)

    def step():
        norm(lin(x)).sum().backward()

    cats, kernels, wall_ms = profile_step(step, iters=3, device=torch.device("cpu"))
    assert sum(cats.values()) == pytest.approx(wall_ms, rel=1e-6)
    assert cats.get("GEMM (linears)", 0) > 0
    assert any(k.startswith("aten::") for k in kernels)
    ops = {}
    profile_step(step, iters=2, device=torch.device("cpu"), ops=ops)
    # by op and input shapes: the linear's matrix product names its (512, 256) input
    assert any(k.startswith(("aten::addmm", "aten::mm")) and "(512, 256)" in k for k in ops)
    assert all(v > 0 for v in ops.values())


@pytest.mark.parametrize("sparse", [False, True])
def test_sample_step_runs_a_guided_step_on_the_cpu(sparse, capsys):
    """benchmarks/sample_step.py: one guided sampling step of the debug SS-DiT (dense or packed condition)."""
    import benchmarks.sample_step as ss

    row = ss.measure("debug", 200, 1, 0, torch.device("cpu"), 0, sparse)
    assert row["batch_tokens"] == 400 and row["step_ms"] > 0 and row["params_m"] > 0
    x, t, cond = ss.guided_batch(ss.DiTConfig.named("debug", sparse_conditions=sparse), 50, torch.device("cpu"),
                                 torch.float32)
    assert x.batch_size == 2 and torch.equal(x.feats[:50], x.feats[50:]) and t.shape == (2,)
    tokens = cond.tokens if sparse else cond
    assert torch.count_nonzero(tokens[len(tokens) // 2:]) == 0  # the second half is the zero condition
