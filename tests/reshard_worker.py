"""One rank of tests/test_train_elastic.py's reshard check (run by torchrun): three AdamW steps of a small
model under our DeepSpeed engine, saved (``save``) or loaded from the saved checkpoint on another number of
ranks (``load``), then three more steps; rank 0 writes the full fp32 weights and moments."""

import sys

import torch
import torch.distributed as dist

from pipeline.train.config import TrainConfig
from pipeline.train.engine import make_engine
from pipeline.train.reshard import load_resharded

folder, stage, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 5), torch.nn.Linear(5, 3))
engine, _, _ = make_engine(model, TrainConfig(zero_stage=stage, lr=1e-2, warmup_steps=4))


def step(i: int) -> None:
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(100 + i))
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()


if mode == "save":
    for i in range(3):
        step(i)
    engine.save_checkpoint(folder, tag="state", client_state={"step": 3})
else:
    assert load_resharded(engine, folder, "state")["step"] == 3
for i in range(3, 6):
    step(i)
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

params = list(engine.module.parameters())
out = {"fp32": [safe_get_full_fp32_param(p) for p in params],
       "exp_avg": [safe_get_full_optimizer_state(p, "exp_avg") for p in params],
       "exp_avg_sq": [safe_get_full_optimizer_state(p, "exp_avg_sq") for p in params], "lr": engine.get_lr()}
if dist.get_rank() == 0:
    torch.save(out, f"{folder}/{mode}-{dist.get_world_size()}.pt")
dist.destroy_process_group()
