"""Resume a ZeRO-1/2 training checkpoint on another number of workers.

DeepSpeed writes one optimizer file per rank holding that rank's slice of each parameter group's flat
fp32 master weights and of the Adam moments. The slices of the W ranks that wrote a checkpoint, in rank
order and without the padding DeepSpeed adds at the end of the last one, are the group's whole flat
buffer; its layout (which parameter sits where) does not depend on the number of ranks, so a run of W'
ranks takes its own slices of it. DeepSpeed refuses a checkpoint of another data-parallel size unless it
is first converted to its "universal" format, whose reader unpickles arbitrary objects; this module reads
the same files as tensors only (``checkpoints.safe_load``) and checks the layout parameter by parameter
before it changes anything.

ZeRO-3 partitions every parameter separately and is not handled here: a ZeRO-3 run resumes on the number
of workers that wrote its checkpoint.
"""
from __future__ import annotations

import glob
import os
import re

import torch

from pipeline.train.safe_load import safe_load

# DeepSpeed's checkpoint keys (deepspeed.checkpoint.constants), spelled out so that this module imports
# without DeepSpeed on hosts that only read weights.
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
BASE_OPTIMIZER_STATE = "base_optimizer_state"
SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
PARAM_SLICE_MAPPINGS = "param_slice_mappings"
GROUP_PADDINGS = "group_paddings"
PARAM_ALIGNMENT_PADDINGS = "param_alignment_paddings"
PARTITION_COUNT = "partition_count"
ZERO_STAGE = "zero_stage"
MOMENTS = ("exp_avg", "exp_avg_sq")
# what the model-states file holds besides the client state (the loop's own "step")
_DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
                   "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                   "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
                   "ds_version"}


class ReshardError(ValueError):
    """The checkpoint cannot be loaded on this number of workers; the message names the file and the reason."""


def optimizer_files(directory: str, tag: str) -> list[str]:
    """The per-rank ZeRO optimizer files of a checkpoint, in rank order."""
    found = glob.glob(os.path.join(directory, tag, "*zero_pp_rank_*_mp_rank_00_optim_states.pt"))  # bf16_ prefix too
    rank = lambda p: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(p)).group(1))  # noqa: E731
    files = sorted(found, key=rank)
    if [rank(p) for p in files] != list(range(len(files))):
        raise ReshardError(f"{os.path.join(directory, tag)}: optimizer files of ranks {[rank(p) for p in files]}; "
                           "expected 0..W-1")
    return files


def _global_offsets(mappings: list[dict], sizes: list[int], where: str) -> dict[str, tuple[int, int]]:
    """name -> (offset in the group's flat buffer, numel) from the per-rank fragment maps of one group."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    out: dict[str, list[int]] = {}
    for r, mapping in enumerate(mappings):
        for name, frag in mapping.items():
            begin = starts[r] + int(frag.start)
            if name not in out:
                out[name] = [begin, int(frag.numel)]
            else:
                if out[name][0] + out[name][1] != begin:
                    raise ReshardError(f"{where}: parameter {name} is not contiguous across ranks")
                out[name][1] += int(frag.numel)
    return {k: (v[0], v[1]) for k, v in out.items()}


def _zero_optimizer(engine, where: str):
    opt = engine.optimizer
    needed = ("single_partition_of_fp32_groups", "partition_size", "groups_padding", "_param_slice_mappings")
    if engine.zero_optimization_stage() not in (1, 2) or not all(hasattr(opt, a) for a in needed):
        raise ReshardError(f"{where}: changing the number of workers needs ZeRO stage 1 or 2 with DeepSpeed's ZeRO "
                           f"optimizer (this run: stage {engine.zero_optimization_stage()}, "
                           f"{type(opt).__name__}); resume with the number of workers that wrote the checkpoint")
    return opt


def load_resharded(engine, directory: str, tag: str) -> dict:
    """Load the checkpoint ``directory/tag`` written by W ranks into ``engine`` running on W' ranks.

    Restores the module weights, the fp32 master weights, Adam's moments and step, the learning-rate
    schedule and DeepSpeed's step counters. Returns the client state saved with the checkpoint.
    """
    where = os.path.join(directory, tag)
    opt = _zero_optimizer(engine, where)
    model_file = os.path.join(directory, tag, "mp_rank_00_model_states.pt")
    if not os.path.exists(model_file):
        raise ReshardError(f"{where}: no mp_rank_00_model_states.pt")
    files = optimizer_files(directory, tag)
    if not files:
        raise ReshardError(f"{where}: no ZeRO optimizer files")
    old = [safe_load(f, f)[OPTIMIZER_STATE_DICT] for f in files]
    for f, sd in zip(files, old):
        if int(sd[ZERO_STAGE]) not in (1, 2):
            raise ReshardError(f"{f}: written by ZeRO stage {int(sd[ZERO_STAGE])}; only stages 1 and 2 reshard")
        if not isinstance(sd[BASE_OPTIMIZER_STATE], dict):
            raise ReshardError(f"{f}: an elastic-format optimizer state; expected DeepSpeed's default layout")
    if old[0].get(PARAM_ALIGNMENT_PADDINGS) != getattr(opt, "round_robin_bit16_padding", None) and \
            PARAM_ALIGNMENT_PADDINGS in old[0]:
        raise ReshardError(f"{where}: parameter alignment differs from this run's ZeRO settings")

    rank = torch.distributed.get_rank(group=opt.dp_process_group)
    world = torch.distributed.get_world_size(group=opt.dp_process_group)
    new_sd = {k: v for k, v in old[0].items()
              if k not in (SINGLE_PARTITION_OF_FP32_GROUPS, BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS, GROUP_PADDINGS,
                           PARTITION_COUNT)}
    base0 = old[0][BASE_OPTIMIZER_STATE]
    fp32_parts, state = [], {}
    for i, mine in enumerate(opt.single_partition_of_fp32_groups):
        sizes = [int(sd[SINGLE_PARTITION_OF_FP32_GROUPS][i].numel()) for sd in old]
        saved = _global_offsets([sd[PARAM_SLICE_MAPPINGS][i] for sd in old], sizes, where)
        p_new = int(opt.partition_size[i])
        here = _global_offsets([opt._param_slice_mappings[i]], [p_new], where)
        # this rank's map covers its slice only: each of its parameters must sit at the same flat offset
        for name, (begin, numel) in here.items():
            at = saved.get(name)
            if at is None or at[0] > rank * p_new + begin or at[0] + at[1] < rank * p_new + begin + numel:
                raise ReshardError(f"{where}: parameter {name} is not where this run's layout puts it "
                                   f"(group {i}); the model or its parameter order changed")
        total = sum(sizes)
        if not p_new * (world - 1) < total <= p_new * world:
            raise ReshardError(f"{where}: group {i} holds {total} values; {world} partitions of {p_new} expected")
        lo, hi = min(rank * p_new, total), min((rank + 1) * p_new, total)

        def whole(get):
            return torch.cat([get(r)[:sizes[r]] for r in range(len(old))])[lo:hi]

        fp32_parts.append(whole(lambda r: old[r][SINGLE_PARTITION_OF_FP32_GROUPS][i]).clone())
        entry = {}
        for key, value in base0["state"][i].items():
            if key in MOMENTS:
                part = whole(lambda r: old[r][BASE_OPTIMIZER_STATE]["state"][i][key])
                entry[key] = torch.nn.functional.pad(part, (0, p_new - part.numel())).to(mine.dtype)
            else:
                entry[key] = value  # the step (the same on every rank)
        state[i] = entry
    new_sd[SINGLE_PARTITION_OF_FP32_GROUPS] = fp32_parts
    new_sd[BASE_OPTIMIZER_STATE] = {"state": state, "param_groups": base0["param_groups"]}
    new_sd[GROUP_PADDINGS] = list(opt.groups_padding)
    new_sd[PARTITION_COUNT] = opt.partition_count
    if PARAM_ALIGNMENT_PADDINGS in old[0]:
        new_sd[PARAM_ALIGNMENT_PADDINGS] = opt.round_robin_bit16_padding

    model = safe_load(model_file, model_file)
    engine.module.load_state_dict(model["module"], strict=True)
    opt.load_state_dict(state_dict_list=[new_sd if r == rank else None for r in range(world)],
                        load_optimizer_states=True, load_from_fp32_weights=True)
    if engine.lr_scheduler is not None and model.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(model["lr_scheduler"])
    engine.global_steps = int(model.get("global_steps", 0))
    engine.skipped_steps = int(model.get("skipped_steps", 0))
    return {k: v for k, v in model.items() if k not in _DEEPSPEED_KEYS}
