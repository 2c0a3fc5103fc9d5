"""Training the 1024³ SS-DiT stage on 8, 32 and 128 GPUs across nodes: step time, efficiency, memory and
cost on paper, from measured single-host figures and a stated network.

Nothing here is measured; every input is. The one-host figures come from ``benchmarks/train_dit.py``
(``--json`` rows at 1 and 2 GPUs, or the defaults below: H100, ZeRO-2, SSA, 46,000 tokens per GPU,
RESULTS "SS-DiT training"), the network from the flags. The model:

- compute per GPU does not change with the GPU count (data parallel, one shape of ~46k tokens per GPU);
- ZeRO-2 moves, per GPU and step, a reduce-scatter of the bf16 gradients and an all-gather of the bf16
  weights: 2 × 2·P·(N−1)/N bytes, at NVLink speed inside a node and at the GPU's share of the node's
  network across nodes (NCCL runs one ring per NIC, so the slowest hop is a GPU's NIC share);
- ``overlap_comm`` hides the gradient traffic behind the backward pass, up to ``--hidden`` of the step;
  the parameter all-gather after the optimizer step is not hidden;
- optimizer step and memory scale as measured between 1 and 2 GPUs: t = a + b/N, m = c + d/N.

    python benchmarks/scale_cost.py                                   # defaults: H100 figures, 400 Gb/s per GPU
    python benchmarks/scale_cost.py --nic-gbps 100 --gpus-per-nic 8   # one 100 Gb/s Ethernet port per node
    python benchmarks/scale_cost.py --rows z2x1.json z2x2.json        # from train_dit.py --json files
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    """One host, ZeRO-2: step seconds and peak GiB per GPU at 1 and 2 GPUs, tokens per GPU, parameters."""
    tokens: int = 46_000
    step1_s: float = 1.328
    step2_s: float = 1.247
    mem1_gib: float = 36.9
    mem2_gib: float = 25.4
    params: float = 514e6
    card: str = "NVIDIA H100 80GB HBM3 (RESULTS, 2026-11-26, m_cmp 8 SSA layer)"


@dataclass(frozen=True)
class Network:
    nvlink_gbs: float = 450.0      # GB/s a GPU sustains to its node's peers (H100 SXM NVLink 4, bus bandwidth)
    nic_gbps: float = 400.0        # Gb/s of one network port
    gpus_per_nic: int = 1          # GPUs sharing one port (1: rail-optimised InfiniBand/RoCE nodes)
    gpus_per_node: int = 8


def comm_seconds(params: float, n: int, net: Network) -> tuple[float, float]:
    """(gradient reduce-scatter, weight all-gather) seconds per step for ZeRO-2 over n GPUs."""
    if n <= 1:
        return 0.0, 0.0
    one_way = 2 * params * (n - 1) / n  # bf16 bytes each GPU sends (and receives) per collective
    if n <= net.gpus_per_node:
        bw = net.nvlink_gbs * 1e9
    else:
        bw = min(net.nvlink_gbs * 1e9, net.nic_gbps / 8 * 1e9 / net.gpus_per_nic)
    return one_way / bw, one_way / bw


def project(m: Measured, net: Network, gpus: list[int], hidden: float, library_shapes: int,
            gpu_hour_usd: float) -> list[dict]:
    # t(N) = a + b/N from the two measured points (b: work ZeRO splits, mostly the optimizer step), with the
    # 2-GPU row's own NVLink traffic taken out first.
    rs2, ag2 = comm_seconds(m.params, 2, net)
    step2_compute = m.step2_s - ag2 - max(0.0, rs2 - hidden * m.step2_s)
    b = 2 * (m.step1_s - step2_compute)
    a = m.step1_s - b
    d = 2 * (m.mem1_gib - m.mem2_gib)
    c = m.mem1_gib - d
    rows = []
    for n in gpus:
        rs, ag = comm_seconds(m.params, n, net)
        exposed = ag + max(0.0, rs - hidden * (a + b / n))
        step = a + b / n + exposed
        tok_s = n * m.tokens / step
        epoch_s = library_shapes * m.tokens / tok_s
        rows.append({"gpus": n, "nodes": -(-n // net.gpus_per_node), "step_s": step, "comm_exposed_s": exposed,
                     "tokens_per_s": tok_s, "efficiency": (m.tokens / step) / (m.tokens / m.step1_s),
                     "mem_gib": c + d / n, "epoch_h": epoch_s / 3600, "gpu_h_per_epoch": n * epoch_s / 3600,
                     "usd_per_epoch": n * epoch_s / 3600 * gpu_hour_usd})
    return rows


def from_rows(paths: list[str]) -> Measured:
    rows = [r for p in paths for r in json.load(open(p)) if "error" not in r and r.get("engine") == "deepspeed"]
    by = {r["gpus"]: r for r in rows if r.get("zero") == 2}
    if 1 not in by or 2 not in by:
        raise SystemExit("--rows needs ZeRO-2 rows at 1 and 2 GPUs (train_dit.py --engine deepspeed --zero 2 --json)")
    r1, r2 = by[1], by[2]
    return Measured(tokens=r1["tokens"], step1_s=r1["step_s"], step2_s=r2["step_s"], mem1_gib=r1["peak_gb"],
                    mem2_gib=r2["peak_gb"], params=r1["params_m"] * 1e6, card=r1.get("device", "?"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", help="train_dit.py --json files with ZeRO-2 rows at 1 and 2 GPUs")
    ap.add_argument("--gpus", default="1,2,8,32,128")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--nvlink-gbs", type=float, default=450.0)
    ap.add_argument("--nic-gbps", type=float, default=400.0)
    ap.add_argument("--gpus-per-nic", type=int, default=1)
    ap.add_argument("--hidden", type=float, default=0.5,
                    help="share of a step's time the gradient traffic can hide behind (overlap_comm's backward)")
    ap.add_argument("--library-shapes", type=int, default=100_000, help="shapes in one epoch")
    ap.add_argument("--gpu-hour-usd", type=float, default=2.5)
    args = ap.parse_args()
    m = from_rows(args.rows) if args.rows else Measured()
    net = Network(args.nvlink_gbs, args.nic_gbps, args.gpus_per_nic, args.gpus_per_node)
    rows = project(m, net, [int(g) for g in args.gpus.split(",")], args.hidden, args.library_shapes,
                   args.gpu_hour_usd)
    print(f"# measured: {m.card}; {m.tokens} tokens per GPU, {m.params / 1e6:.0f} M parameters; "
          f"1 GPU {m.step1_s:.3f} s / {m.mem1_gib:.1f} GiB, 2 GPUs {m.step2_s:.3f} s / {m.mem2_gib:.1f} GiB")
    print(f"# network: NVLink {net.nvlink_gbs:.0f} GB/s per GPU, {net.nic_gbps:.0f} Gb/s per port, "
          f"{net.gpus_per_nic} GPU(s) a port, {net.gpus_per_node} GPUs a node; gradient traffic hidden up to "
          f"{args.hidden:.0%} of a step; epoch = {args.library_shapes:,} shapes; ${args.gpu_hour_usd}/GPU-hour")
    print("| GPUs | nodes | step (s) | exposed comm (s) | tokens/s | efficiency | GiB per GPU | hours per epoch | "
          "GPU-hours per epoch | $ per epoch |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['gpus']} | {r['nodes']} | {r['step_s']:.3f} | {r['comm_exposed_s']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['efficiency']:.2f} | {r['mem_gib']:.1f} | {r['epoch_h']:.2f} | {r['gpu_h_per_epoch']:.0f} | "
              f"{r['usd_per_epoch']:,.0f} |")


if __name__ == "__main__":
    main()
