"""Resume a ZeRO-1, 2 or 3 training checkpoint on another number of workers.

ZeRO-1/2: DeepSpeed writes one optimizer file per rank holding that rank's slice of each parameter group's
flat fp32 master weights and of the Adam moments. The slices of the W ranks that wrote a checkpoint, in
rank order and without the padding DeepSpeed adds at the end of the last one, are the group's whole flat
buffer; its layout (which parameter sits where) does not depend on the number of ranks, so a run of W'
ranks takes its own slices of it.

ZeRO-3 partitions every parameter on its own: a parameter of n values is flattened, padded to a multiple
of W and rank r holds values [r*ceil(n/W), (r+1)*ceil(n/W)). A rank's optimizer file holds, per sub-group,
the concatenation of its partitions of the sub-group's parameters (fp32 master weights, and the Adam
moments in the same layout); the model-states file of each rank names the parameters of every sub-group
and their shapes (``param_shapes``), and holds that rank's partitions of frozen parameters. Each parameter
is put back together from the W files and cut again into the new run's W' partitions; sub-groups are
matched by parameter name, since their split depends on the partition sizes.

DeepSpeed refuses a checkpoint of another data-parallel size unless it is first converted to its
"universal" format, whose reader unpickles arbitrary objects; this module reads the same files as tensors
only (``checkpoints.safe_load``) and checks the layout parameter by parameter before it changes anything.
A file missing, of another stage or inconsistent with the others is a ``ReshardError`` naming it.
"""
from __future__ import annotations

import glob
import math
import os
import re

import torch

from pipeline.train.safe_load import safe_load

# DeepSpeed's checkpoint keys (deepspeed.checkpoint.constants), spelled out so that this module imports
# without DeepSpeed on hosts that only read weights.
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
BASE_OPTIMIZER_STATE = "base_optimizer_state"
SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
FP32_FLAT_GROUPS = "fp32_flat_groups"
PARAM_SLICE_MAPPINGS = "param_slice_mappings"
GROUP_PADDINGS = "group_paddings"
PARAM_ALIGNMENT_PADDINGS = "param_alignment_paddings"
PARTITION_COUNT = "partition_count"
ZERO_STAGE = "zero_stage"
PARAM_SHAPES = "param_shapes"
FROZEN_PARAM_SHAPES = "frozen_param_shapes"
FROZEN_PARAM_FRAGMENTS = "frozen_param_fragments"
MOMENTS = ("exp_avg", "exp_avg_sq")
# what the model-states file holds besides the client state (the loop's own "step")
_DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
                   "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                   "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
                   "ds_version", "shared_params", "checkpoint_parallel_dimensions"}


class ReshardError(ValueError):
    """The checkpoint cannot be loaded on this number of workers; the message names the file and the reason."""


def _rank_files(directory: str, tag: str, pattern: str) -> list[str]:
    found = glob.glob(os.path.join(directory, tag, pattern))
    rank = lambda p: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(p)).group(1))  # noqa: E731
    files = sorted(found, key=rank)
    if [rank(p) for p in files] != list(range(len(files))):
        raise ReshardError(f"{os.path.join(directory, tag)}: {pattern.lstrip('*')} files of ranks "
                           f"{[rank(p) for p in files]}; expected 0..W-1")
    return files


def optimizer_files(directory: str, tag: str) -> list[str]:
    """The per-rank ZeRO optimizer files of a checkpoint, in rank order."""
    return _rank_files(directory, tag, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")  # bf16_ prefix too


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


_NEEDED = {2: ("single_partition_of_fp32_groups", "partition_size", "groups_padding", "_param_slice_mappings"),
           3: ("fp32_partitioned_groups_flat", "fp16_groups", "sub_group_to_group_id", "checkpoint_event_prologue",
               "checkpoint_event_epilogue")}


def _zero_optimizer(engine, where: str):
    opt, stage = engine.optimizer, engine.zero_optimization_stage()
    needed = _NEEDED[3 if stage == 3 else 2]
    if stage not in (1, 2, 3) or not all(hasattr(opt, a) for a in needed):
        raise ReshardError(f"{where}: changing the number of workers needs ZeRO stage 1, 2 or 3 with DeepSpeed's "
                           f"ZeRO optimizer (this run: stage {stage}, {type(opt).__name__}); resume with the number "
                           "of workers that wrote the checkpoint")
    return opt


def load_resharded(engine, directory: str, tag: str) -> dict:
    """Load the checkpoint ``directory/tag`` written by W ranks into ``engine`` running on W' ranks.

    Restores the module weights, the fp32 master weights, Adam's moments and step, the learning-rate
    schedule and DeepSpeed's step counters. Returns the client state saved with the checkpoint.
    """
    where = os.path.join(directory, tag)
    opt = _zero_optimizer(engine, where)
    stage = engine.zero_optimization_stage()
    files = optimizer_files(directory, tag)
    if not files:
        raise ReshardError(f"{where}: no ZeRO optimizer files")
    old = [safe_load(f, f)[OPTIMIZER_STATE_DICT] for f in files]
    for f, sd in zip(files, old):
        written = int(sd[ZERO_STAGE])
        if written != stage and not (written in (1, 2) and stage in (1, 2)):
            raise ReshardError(f"{f}: written by ZeRO stage {written}; this run uses stage {stage}")
    model = _load_zero3(engine, opt, files, old, where) if stage == 3 else _load_zero12(engine, opt, files, old,
                                                                                          where)
    if engine.lr_scheduler is not None and model.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(model["lr_scheduler"])
    engine.global_steps = int(model.get("global_steps", 0))
    engine.skipped_steps = int(model.get("skipped_steps", 0))
    return {k: v for k, v in model.items() if k not in _DEEPSPEED_KEYS}


def _load_zero12(engine, opt, files: list[str], old: list[dict], where: str) -> dict:
    """ZeRO-1/2: each group's flat buffer from the ranks' slices in order, cut into this run's slices."""
    model_file = os.path.join(where, "mp_rank_00_model_states.pt")
    if not os.path.exists(model_file):
        raise ReshardError(f"{where}: no mp_rank_00_model_states.pt")
    for f, sd in zip(files, old):
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
    return model


def _joined(parts: list[torch.Tensor], shape, where: str, name: str) -> torch.Tensor:
    """One ZeRO-3 parameter from its W rank partitions (each ceil(n/W) values; the last ones padding)."""
    n, world = math.prod(shape), len(parts)
    size = math.ceil(n / world)
    if any(p.numel() != size for p in parts):
        raise ReshardError(f"{where}: parameter {name} of shape {tuple(shape)} has partitions of "
                           f"{[p.numel() for p in parts]} values; {world} of {size} expected")
    return torch.cat([p.reshape(-1) for p in parts])[:n].view(*shape)


def _partition(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a whole parameter (``_joined``'s inverse for one rank)."""
    size = math.ceil(full.numel() / world)
    flat = torch.nn.functional.pad(full.reshape(-1), (0, size * world - full.numel()))
    return flat[rank * size:(rank + 1) * size]


def _zero3_whole(files: list[str], old: list[dict], models: list[dict], where: str) -> dict[str, dict]:
    """name -> {"fp32", "exp_avg", "exp_avg_sq": whole tensor} from every rank's ZeRO-3 optimizer file."""
    world = len(files)
    shapes = models[0][PARAM_SHAPES]
    whole: dict[str, dict] = {}
    for f, sd in zip(files, old):
        if int(sd[PARTITION_COUNT]) != world:
            raise ReshardError(f"{f}: written as one of {int(sd[PARTITION_COUNT])} partitions; the checkpoint "
                               f"holds {world} optimizer files")
        if "ds_zero_partition_groups" in sd:
            raise ReshardError(f"{f}: expert-parallel ZeRO-3 partition groups; only data-parallel ones reshard")
        ids = [i for g in sd[OPTIMIZER_STATE_DICT]["param_groups"] for i in g["params"]]
        if ids != list(range(len(shapes))) or len(sd[FP32_FLAT_GROUPS]) != len(shapes):
            raise ReshardError(f"{f}: {len(sd[FP32_FLAT_GROUPS])} flat groups and optimizer entries {ids}; the "
                               f"model-states file names {len(shapes)} sub-groups")
    for g, group in enumerate(shapes):
        sizes = [math.ceil(math.prod(s) / world) for s in group.values()]

        def pieces(f: str, flat: torch.Tensor, what: str) -> tuple:
            if flat.numel() != sum(sizes):
                raise ReshardError(f"{f}: sub-group {g} {what} holds {flat.numel()} values; its parameters' "
                                   f"partitions on {world} ranks make {sum(sizes)}")
            return flat.reshape(-1).split(sizes)

        per_rank = []
        for f, sd in zip(files, old):
            state = sd[OPTIMIZER_STATE_DICT]["state"].get(g, {})
            missing = [k for k in MOMENTS if k not in state]
            if missing:
                raise ReshardError(f"{f}: sub-group {g} has no {missing[0]}; expected Adam's moments")
            per_rank.append({"fp32": pieces(f, sd[FP32_FLAT_GROUPS][g], "fp32 weights"),
                             **{k: pieces(f, state[k], k) for k in MOMENTS}})
        for j, (name, shape) in enumerate(group.items()):
            if name in whole:
                raise ReshardError(f"{where}: parameter {name} appears in two sub-groups")
            whole[name] = {k: _joined([r[k][j] for r in per_rank], shape, where, name) for k in per_rank[0]}
    return whole


def _load_zero3(engine, opt, files: list[str], old: list[dict], where: str) -> dict:
    """ZeRO-3: every parameter (master weights, moments; frozen ones too) whole again, then partitioned anew."""
    world_old = len(files)
    model_files = _rank_files(os.path.dirname(where), os.path.basename(where),
                              "zero_pp_rank_*_mp_rank_00_model_states.pt")
    if len(model_files) != world_old:
        raise ReshardError(f"{where}: {len(model_files)} model-states files and {world_old} optimizer files")
    models = [safe_load(f, f) for f in model_files]
    for f, m in zip(model_files, models):
        if int(m.get("dp_world_size", -1)) != world_old or not isinstance(m.get(PARAM_SHAPES), list):
            raise ReshardError(f"{f}: written by {m.get('dp_world_size')} ranks with parameter shapes "
                               f"{type(m.get(PARAM_SHAPES)).__name__}; the checkpoint holds {world_old} ranks' files")
    whole = _zero3_whole(files, old, models, where)

    rank = torch.distributed.get_rank(group=opt.dp_process_group)
    world = torch.distributed.get_world_size(group=opt.dp_process_group)
    names = engine.param_names
    trained = [names[p] for group in opt.fp16_groups for p in group]
    if sorted(trained) != sorted(whole):
        gone, new = sorted(set(whole) - set(trained)), sorted(set(trained) - set(whole))
        raise ReshardError(f"{where}: the checkpoint trains other parameters than this run (only saved: "
                           f"{gone[:3]}, only here: {new[:3]})")
    flats, ids, state = {k: [] for k in ("fp32", *MOMENTS)}, [], {}
    step = {k: v for k, v in old[0][OPTIMIZER_STATE_DICT]["state"][0].items() if k not in MOMENTS}
    for i, group in enumerate(opt.fp16_groups):
        for key in flats:
            parts = []
            for p in group:
                full = whole[names[p]][key]
                if tuple(full.shape) != tuple(p.ds_shape):
                    raise ReshardError(f"{where}: parameter {names[p]} has shape {tuple(full.shape)} in the "
                                       f"checkpoint, {tuple(p.ds_shape)} here")
                parts.append(_partition(full, rank, world))
            flats[key].append(torch.cat(parts) if parts else torch.empty(0))
        mine = opt.fp32_partitioned_groups_flat[i]
        if flats["fp32"][i].numel() != mine.numel():
            raise ReshardError(f"{where}: sub-group {i} holds {flats['fp32'][i].numel()} values resharded, "
                               f"{mine.numel()} in this run's partition")
    # torch numbers the optimizer's tensors group by group; DeepSpeed gives each sub-group one tensor
    saved_groups = old[0][OPTIMIZER_STATE_DICT]["param_groups"]
    if len(saved_groups) != len(opt.optimizer.param_groups):
        raise ReshardError(f"{where}: {len(saved_groups)} optimizer parameter groups saved, "
                           f"{len(opt.optimizer.param_groups)} in this run")
    groups = []
    for g, saved in enumerate(saved_groups):
        subs = [i for i in range(len(opt.fp16_groups)) if opt.sub_group_to_group_id[i] == g]
        groups.append({**saved, "params": list(range(len(ids), len(ids) + len(subs)))})
        for i in subs:
            # a step tensor of its own: torch's AdamW counts each tensor's steps in place
            state[len(ids)] = {**{k: v.clone() if torch.is_tensor(v) else v for k, v in step.items()},
                               **{k: flats[k][i].to(opt.fp32_partitioned_groups_flat[i].dtype) for k in MOMENTS}}
            ids.append(i)
    if ids != list(range(len(opt.fp16_groups))):
        raise ReshardError(f"{where}: this run's sub-groups are not ordered by parameter group ({ids})")
    new_sd = {k: v for k, v in old[0].items() if k not in (FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARTITION_COUNT)}
    new_sd.update({PARTITION_COUNT: opt.partition_count, FP32_FLAT_GROUPS: flats["fp32"],
                   OPTIMIZER_STATE_DICT: {"state": state, "param_groups": groups}})

    opt.checkpoint_event_prologue()  # every parameter partitioned, as DeepSpeed's own load does
    engine.module.load_state_dict(models[0]["module"], strict=True)  # buffers; parameters are empty placeholders
    opt.load_state_dict(state_dict_list=[new_sd if r == rank else None for r in range(world)],
                        load_optimizer_states=True, load_from_fp32_weights=True)
    _load_frozen(engine, models, rank, world, where)
    opt.checkpoint_event_epilogue()
    return models[0]


def _load_frozen(engine, models: list[dict], rank: int, world: int, where: str) -> None:
    """Frozen ZeRO-3 parameters: each rank's model-states file holds its partitions; whole, then partitioned anew."""
    shapes = models[0].get(FROZEN_PARAM_SHAPES) or {}
    here = {engine.param_names[p]: p for p in engine.module.parameters() if not p.requires_grad}
    if sorted(shapes) != sorted(here):
        raise ReshardError(f"{where}: frozen parameters {sorted(shapes)[:3]} saved, {sorted(here)[:3]} here")
    for name, shape in shapes.items():
        full = _joined([m[FROZEN_PARAM_FRAGMENTS][name] for m in models], shape, where, name)
        p = here[name]
        target = p.ds_tensor if hasattr(p, "ds_tensor") else p
        target.data.copy_(_partition(full, rank, world) if hasattr(p, "ds_tensor") else full)
