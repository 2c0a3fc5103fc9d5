"""benchmarks/scale_cost.py reproduces its measured rows and moves ZeRO-2's bytes at the stated speeds."""
import pytest

from benchmarks.scale_cost import Measured, Network, comm_seconds, project


def test_the_fit_reproduces_the_measured_one_and_two_gpu_steps_and_memory():
    m, net = Measured(), Network()
    r1, r2 = project(m, net, [1, 2], hidden=0.5, library_shapes=1000, gpu_hour_usd=1.0)
    assert r1["step_s"] == pytest.approx(m.step1_s) and r2["step_s"] == pytest.approx(m.step2_s)
    assert r1["mem_gib"] == pytest.approx(m.mem1_gib) and r2["mem_gib"] == pytest.approx(m.mem2_gib)
    assert r1["efficiency"] == pytest.approx(1.0)
    assert r1["epoch_h"] == pytest.approx(1000 * m.tokens / (m.tokens / m.step1_s) / 3600)


def test_zero2_bytes_over_the_slowest_hop():
    p = 500e6
    assert comm_seconds(p, 1, Network()) == (0.0, 0.0)
    # 16 GPUs over 2 nodes, one 400 Gb/s port per GPU: 2 * P * 15/16 bytes at 50 GB/s each way
    rs, ag = comm_seconds(p, 16, Network(nic_gbps=400, gpus_per_nic=1))
    assert rs == ag == pytest.approx(2 * p * 15 / 16 / 50e9)
    # inside one node: NVLink
    assert comm_seconds(p, 8, Network(nvlink_gbs=450))[0] == pytest.approx(2 * p * 7 / 8 / 450e9)
    # a thin shared port makes the exposed traffic grow, and efficiency fall, across nodes
    thin = project(Measured(), Network(nic_gbps=100, gpus_per_nic=8), [8, 32], 0.5, 1000, 1.0)
    assert thin[1]["comm_exposed_s"] > 10 * thin[0]["comm_exposed_s"] and thin[1]["efficiency"] < 0.8
