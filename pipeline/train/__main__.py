"""``python -m pipeline.train NETWORK --flags``: the training loop without Ray, under torchrun or ``deepspeed``.

    torchrun --nproc_per_node 8 -m pipeline.train dit --shards /data/dataset --model paper --use-gpu true
    deepspeed --num_gpus 8 --module pipeline.train dit ...

For GPU hosts that have PyTorch alone: same loop, same flags as ``s2 train``, checkpoints under
``<storage>/<name>/checkpoint_<step>`` and resumed from the newest one on restart.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline import config
from pipeline.config import ConfigError
from pipeline.train.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = config.Parser(prog="python -m pipeline.train", description=__doc__.splitlines()[0])
    parser.add_argument("network_name", choices=["dit", "structure_vae", "structure_dit", "vae"])
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    config.add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    if args.network is not None and args.network != args.network_name:
        print(f"--network {args.network} contradicts {args.network_name}", file=sys.stderr)
        return 2
    args.network = args.network_name
    try:
        cfg = config.from_args(TrainConfig, args)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from pipeline.shards import ShardError
    from pipeline.train.checkpoints import CheckpointMismatch
    from pipeline.train.data import NoTrainableShapes
    from pipeline.train.loop import run_without_ray

    ours = not dist.is_initialized()  # end only a process group this run made (a caller's stays usable)
    try:
        out = run_without_ray(cfg)
    except (CheckpointMismatch, ShardError, NoTrainableShapes, ConfigError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        if ours and dist.is_initialized():
            dist.destroy_process_group()
        return 1
    if dist.get_rank() == 0:
        print(json.dumps({"step": out["step"], "first_loss": out["history"]["loss"][:1],
                          "final_loss": out["history"]["loss"][-1:], "skipped_shapes": len(out["skipped_shapes"])}))
    if ours:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
