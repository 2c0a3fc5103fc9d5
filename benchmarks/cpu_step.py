"""The demo's training steps on a CPU: each speed-up against its baseline, in the same process, same batch.

Every network of ``s2 demo`` is built as its job builds it (``pipeline.commands.demo``'s sizes, learning rates,
token budgets and image encoder; the trainer's task, its DeepSpeed engine with ZeRO-2 and the EMA), on the
shards and frozen VAE latents of a finished demo run, and one step (forward, backward, optimizer step, EMA
update) is timed on the first packed batch of the shards:

    s2 demo --quick --data DIR                       # once: shards and checkpoints
    python benchmarks/cpu_step.py --data DIR         # all pairs below, one thread
    python benchmarks/cpu_step.py --data DIR --networks structure_dit,dit --steps 6

Pairs (the variant the trainer runs now, then its baseline; each variant a fresh engine with the same seed):
- every network: AdamW with ``fused=True`` (``pipeline.train.engine.fused_adamw_ok``) / torch's default loop;
- ``structure_vae`` and ``vae``: convolutions with bfloat16 operands (``--cpu-conv-precision bf16``, the demo's
  ``auto`` on a CPU with AMX or AVX-512 BF16) / float32;
- ``structure_dit`` and ``dit``: linear layers under bfloat16 autocast, attention float32 (``--cpu-dit-precision
  bf16``, model/cpu_precision.py) / float32;
- ``structure_vae``: the trunks' activations channels-last (``model.dense_vae.CPU_CHANNELS_LAST``) / PyTorch's
  default layout;
- ``structure_dit``: the q/k norms with ``kernels/head_rms_norm``'s CPU backward / written in PyTorch through
  autograd (``model.dense_dit.FUSED_HEAD_NORMS`` off).

Speed is printed, never asserted; record the table, the CPU model and the date in RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

NETWORKS = ("structure_vae", "structure_dit", "vae", "dit")


def _config(net: str, data: Path, steps: int):
    from pipeline.commands import demo
    from pipeline.train.config import TrainConfig

    job = net.replace("_", "-")
    kw = dict(network=net, shards=str(data / "dataset"), resolution=64, model="debug", lr=demo.DEBUG_LR[job],
              warmup_steps=demo.DEBUG_WARMUP, steps=steps, zero_stage=2)
    if net == "structure_dit":
        kw.update(model="debug_grid", structure_vae=str(data / "runs" / "demo-structure-vae-latents"),
                  image_encoder=demo.IMAGE_ENCODER)
    elif net == "vae":
        kw.update(model="debug_r4", token_budget=demo.VAE_TOKEN_BUDGET, oversize="alone",
                  lr_schedule=demo.VAE_LR_SCHEDULE, kl_weight=demo.VAE_KL_WEIGHT)
    elif net == "dit":
        kw.update(model=demo.DIT_MODEL["debug_r4"], latent=str(data / "runs" / "demo-vae-latents"),
                  image_encoder=demo.IMAGE_ENCODER)
    if net in ("structure_dit", "dit"):
        kw.update(cpu_dit_precision=demo.DIT_PRECISION)
    return TrainConfig(**kw)


def _first_batch(task, cfg, samples):
    """The trainer's packing of the shards in stored order (an oversize 'alone' shape counts at the budget)."""
    from pipeline.train.data import Skipped, token_batches

    items = [task.prepare(s) for s in samples]
    return next(iter(token_batches(items, cfg.token_budget, lambda i: i.tokens, lambda i: i.name, Skipped())))


def time_step(net: str, cfg, samples, *, fused: bool | None, conv_bf16: bool, reference_norms: bool,
              dit_bf16: bool, channels_last: bool, steps: int, warmup: int) -> tuple[float, float, int]:
    """Median seconds of one training step, the last loss, and the items in the batch."""
    import model.dense_dit as dense_dit
    import model.dense_vae as dense_vae
    from kernels.sparse_conv import gather_gemm
    from pipeline.train import checkpoints, tasks
    from pipeline.train.engine import EMA, make_engine

    gather_gemm.GEMM_DTYPE = torch.bfloat16 if conv_bf16 else None
    dense_dit.FUSED_HEAD_NORMS = not reference_norms  # off: the norm written in PyTorch, through autograd
    dense_vae.CPU_CHANNELS_LAST = channels_last  # the structure VAE's trunks (and the frozen one the DiT reads)
    frozen = checkpoints.load_weights(cfg.structure_vae, "structure_vae") if net == "structure_dit" else None
    torch.manual_seed(cfg.seed)
    task = tasks.build_task(cfg, seed=cfg.seed * 1009, frozen_weights=frozen)
    if hasattr(task.module, "cpu_bf16"):  # a DiT: its linear layers in bfloat16 or float32 (cpu_dit_precision)
        task.module.cpu_bf16 = dit_bf16
    batch = _first_batch(task, cfg, samples)
    engine, _, _ = make_engine(task.module, cfg, fused=fused)
    ema = EMA(engine.module, cfg.ema_decay, warmup=True)
    times = []
    try:
        for i in range(warmup + steps):
            t = time.perf_counter()
            loss, _ = engine(**task.collate(batch, "cpu", torch.float32))
            engine.backward(loss)
            engine.step()
            ema.update(i)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    finally:
        gather_gemm.GEMM_DTYPE, dense_dit.FUSED_HEAD_NORMS, dense_vae.CPU_CHANNELS_LAST = None, True, True
    return statistics.median(times), loss.detach().item(), len(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a finished `s2 demo --data DIR` folder (dataset/, runs/)")
    ap.add_argument("--networks", default=",".join(NETWORKS))
    ap.add_argument("--steps", type=int, default=4, help="timed steps a variant (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a demo job runs one while both chains run)")
    args = ap.parse_args()
    nets = [n for n in args.networks.split(",") if n]
    unknown = set(nets) - set(NETWORKS)
    if unknown:
        raise SystemExit(f"--networks: unknown {sorted(unknown)}; choose from {', '.join(NETWORKS)}")
    data = Path(args.data)
    if not (data / "dataset").is_dir():
        raise SystemExit(f"{data}: no dataset/ folder; run `s2 demo --quick --data {data}` first")
    torch.set_num_threads(args.threads)
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)

    from kernels.sparse_conv.gather_gemm import cpu_bf16_gemm
    from pipeline.shards import read_samples
    from pipeline.train.tasks import cpu_dit_bf16

    isa = cpu_bf16_gemm()
    samples = list({s.mesh_id: s for s in read_samples(str(data / "dataset"), resolution=64)}.values())
    print(f"{platform.processor() or platform.machine()}, {args.threads} thread(s), bfloat16 GEMMs {isa or 'emulated'}, "
          f"torch {torch.__version__}, {len(samples)} shapes, median of {args.steps} steps")
    print("| network | items | variant (now) | baseline | step (ms) | baseline (ms) | speed-up | loss / baseline loss |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | --- |")
    for net in nets:
        cfg = _config(net, data, args.warmup + args.steps)
        conv = net in ("structure_vae", "vae") and bool(isa)  # the demo's `auto`
        dits = net in ("structure_dit", "dit")
        base = dict(fused=None, conv_bf16=conv, reference_norms=False, channels_last=True,
                    dit_bf16=dits and cpu_dit_bf16(cfg))  # the demo's settings
        pairs = [("fused AdamW", "default AdamW", base, {**base, "fused": False})]
        if net in ("structure_vae", "vae"):
            if isa:
                pairs.append(("bf16 convolutions", "fp32", base, {**base, "conv_bf16": False}))
            else:
                print(f"| {net} | | bf16 convolutions | fp32 | – | – | – | no bfloat16 GEMM instructions on this CPU: the demo runs fp32 |")
        if dits:
            if isa:
                pairs.append(("bf16 linears", "fp32", {**base, "dit_bf16": True}, {**base, "dit_bf16": False}))
            else:
                print(f"| {net} | | bf16 linears | fp32 | – | – | – | no bfloat16 GEMM instructions on this CPU: the demo runs fp32 |")
        if net == "structure_vae":
            pairs.append(("channels-last trunks", "default layout", base, {**base, "channels_last": False}))
        if net == "structure_dit":
            pairs.append(("q/k norm CPU backward", "autograd reference", base, {**base, "reference_norms": True}))
        for name, base_name, now, before in pairs:
            t1, l1, n = time_step(net, cfg, samples, steps=args.steps, warmup=args.warmup, **now)
            t0, l0, _ = time_step(net, cfg, samples, steps=args.steps, warmup=args.warmup, **before)
            print(f"| {net} | {n} | {name} | {base_name} | {t1 * 1e3:.0f} | {t0 * 1e3:.0f} | {t0 / t1:.2f}× | "
                  f"{l1:.4f} / {l0:.4f} |", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
