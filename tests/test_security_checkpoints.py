"""Nothing we load can run code: a pickle planted in each kind of checkpoint file is refused, by name."""
import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.shards import write_shard
from pipeline.train import checkpoints
from pipeline.train.config import TrainConfig
from pipeline.train.synthetic import synthetic_rows

RES = 32


class Payload:
    """Unpickling this runs ``exec``: what an attacker with write access to a run folder would plant."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _plant(path: Path, marker: Path) -> None:
    """Replace a checkpoint file by a pickle that keeps its keys' look but carries the payload."""
    torch.save({"state_dict": {}, "module": Payload(str(marker)), "step": 1}, path)


@pytest.fixture(scope="module")
def trained(local_dist, tmp_path_factory):
    """One checkpoint per ZeRO layout we write: stage 0 (optimizer in the model file), 2, 3 (partitioned)."""
    from pipeline.train.loop import run_without_ray

    root = tmp_path_factory.mktemp("pickles")
    write_shard(str(root / "data"), [dataclasses.replace(r, views=[]) for r in synthetic_rows(4, RES, seed=1)])
    out = {}
    for stage in (0, 2, 3):
        cfg = TrainConfig(network="dit", shards=str(root / "data"), resolution=RES, steps=1, checkpoint_every=1,
                          zero_stage=stage, token_budget=1500, storage=str(root / "runs"), name=f"z{stage}")
        run_without_ray(cfg)
        out[stage] = (cfg, root / "runs" / f"z{stage}" / "checkpoint_00000001")
    return out


def _kinds(ckpt: Path) -> list[str]:
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*.pt"))


def test_checkpoint_files_are_what_we_expect(trained):
    assert _kinds(trained[0][1]) == ["loop-rank0.pt", "state/mp_rank_00_model_states.pt", "weights.pt"]
    assert _kinds(trained[2][1]) == ["loop-rank0.pt", "state/mp_rank_00_model_states.pt",
                                     "state/zero_pp_rank_0_mp_rank_00_optim_states.pt", "weights.pt"]
    assert _kinds(trained[3][1]) == ["loop-rank0.pt", "state/zero_pp_rank_0_mp_rank_00_model_states.pt",
                                     "state/zero_pp_rank_0_mp_rank_00_optim_states.pt", "weights.pt"]


def _every_file():
    return [(stage, kind) for stage, kinds in (
        (0, ["loop-rank0.pt", "state/mp_rank_00_model_states.pt", "weights.pt"]),
        (2, ["state/mp_rank_00_model_states.pt", "state/zero_pp_rank_0_mp_rank_00_optim_states.pt"]),
        (3, ["state/zero_pp_rank_0_mp_rank_00_model_states.pt", "state/zero_pp_rank_0_mp_rank_00_optim_states.pt"]),
    ) for kind in kinds]


@pytest.mark.parametrize("stage,kind", _every_file())
def test_planted_pickle_is_refused_on_resume(trained, tmp_path, stage, kind):
    """A run resuming from a folder where one file was replaced stops with UnsafeCheckpoint naming that file,
    and the payload never runs (while plain ``torch.load(weights_only=False)`` would have run it)."""
    from pipeline.train.loop import run_without_ray

    cfg, ckpt = trained[stage]
    run = tmp_path / "runs" / cfg.name
    shutil.copytree(ckpt, run / ckpt.name)
    marker = tmp_path / "ran"
    _plant(run / ckpt.name / kind, marker)
    with pytest.raises(checkpoints.UnsafeCheckpoint, match=f"{kind}: refused, it is not plain tensor data"):
        run_without_ray(dataclasses.replace(cfg, storage=str(tmp_path / "runs"), steps=2))
    assert not marker.exists()
    torch.load(run / ckpt.name / kind, weights_only=False)  # the plant is real: unguarded, it runs
    assert marker.read_text() == "ran"


def test_planted_weights_refused_for_init_from_and_latent(trained, tmp_path):
    """weights.pt is also what init_from, --latent, --structure-vae and sampling read (load_weights)."""
    _, ckpt = trained[2]
    folder = tmp_path / "run" / ckpt.name
    shutil.copytree(ckpt, folder)
    marker = tmp_path / "ran"
    _plant(folder / "weights.pt", marker)
    with pytest.raises(checkpoints.UnsafeCheckpoint, match="weights.pt: refused"):
        checkpoints.load_weights(str(folder), "dit")
    with pytest.raises(checkpoints.UnsafeCheckpoint, match="weights.pt: refused"):
        checkpoints.load_weights(str(tmp_path / "run"), "dit")  # through its run folder: same file
    assert not marker.exists()


def test_planted_weights_refused_on_s3(trained, s3_server, tmp_path):
    import s3fs

    _, ckpt = trained[2]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.mkdir("planted")
    marker = tmp_path / "ran"
    _plant(tmp_path / "evil.pt", marker)
    fs.put_file(str(ckpt / "meta.json"), "planted/c/meta.json")
    fs.put_file(str(tmp_path / "evil.pt"), "planted/c/weights.pt")
    with pytest.raises(checkpoints.UnsafeCheckpoint, match="s3://planted/c/weights.pt: refused"):
        checkpoints.load_weights("s3://planted/c", "dit")
    assert not marker.exists()


def test_safe_load_allows_only_deepspeed_records(tmp_path):
    """The allowlist is three DeepSpeed record classes; a class of ours, or of torch, is still refused."""
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(checkpoints.UnsafeCheckpoint, match="module.pt"):
        checkpoints.safe_load(tmp_path / "module.pt", str(tmp_path / "module.pt"))
    from pipeline.train import safe_load

    names = sorted(f"{c.__module__}.{c.__name__}" for c in safe_load._deepspeed_globals())
    assert names == ["deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address"]
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") is None
