"""One rank of tests/test_train_elastic.py's reshard checks (started with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set, no launcher): three AdamW steps of a small model under our DeepSpeed engine, saved (``save``)
or loaded from the saved checkpoint on another number of ranks (``load``), then three more steps; rank 0
writes the full fp32 weights and moments. ``argv[4]``, when given, is ZeRO-3's ``sub_group_size``: small
sub-groups whose split changes with the number of ranks."""

import os
import sys

import torch
import torch.distributed as dist

from pipeline.train import engine as engine_module
from pipeline.train.config import TrainConfig
from pipeline.train.engine import make_engine
from pipeline.train.reshard import load_resharded

folder, stage, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if len(sys.argv) > 4:
    base = engine_module.deepspeed_config
    engine_module.deepspeed_config = lambda cfg: {**base(cfg), "zero_optimization": {
        **base(cfg)["zero_optimization"], "sub_group_size": int(sys.argv[4])}}
dist.init_process_group("gloo")
torch.manual_seed(0)
# parameters of 91, 13, 65, 5, 15 and 3 values: ZeRO-3 pads most of them on 2 and on 3 ranks
model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 5), torch.nn.Linear(5, 3))
engine, _, _ = make_engine(model, TrainConfig(zero_stage=stage, lr=1e-2, warmup_steps=4))


def step(i: int) -> None:
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(100 + i))
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()


def full_state() -> dict:
    """Collective under ZeRO-3: every parameter's fp32 master weights and moments, whole."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = list(engine.module.parameters())
    return {"fp32": [safe_get_full_fp32_param(p) for p in params],
            "exp_avg": [safe_get_full_optimizer_state(p, "exp_avg") for p in params],
            "exp_avg_sq": [safe_get_full_optimizer_state(p, "exp_avg_sq") for p in params], "lr": engine.get_lr(),
            "sub_groups": len(getattr(engine.optimizer, "fp16_groups", []))}


if mode == "save":
    for i in range(3):
        step(i)
    engine.save_checkpoint(folder, tag="state", client_state={"step": 3})
    saved = full_state()  # what the checkpoint holds
else:
    assert load_resharded(engine, folder, "state")["step"] == 3
for i in range(3, 6):
    step(i)
out = full_state()
if dist.get_rank() == 0:
    if mode == "save":
        torch.save(saved, f"{folder}/saved-{dist.get_world_size()}.pt")
    torch.save(out, f"{folder}/{mode}-{dist.get_world_size()}.pt")
dist.destroy_process_group()
# Results are on disk. Leave without the interpreter's teardown: a gloo/DeepSpeed thread still joinable at
# exit makes std::terminate abort some ZeRO-3 runs (-6, "terminate called without an active exception").
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
