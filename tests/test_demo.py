"""The demo's scoring (pipeline/evaluate.py) and the order and flags of its training jobs."""
import shlex
import time

import numpy as np
import pytest
import trimesh

from pipeline import evaluate
from pipeline.commands import demo


def _sphere(radius=0.8, offset=(0.0, 0.0, 0.0)):
    m = trimesh.creation.icosphere(subdivisions=3, radius=radius)
    return np.asarray(m.vertices + np.asarray(offset), np.float32), np.asarray(m.faces, np.int64)


def test_mesh_row_scores_a_mesh_against_itself_and_counts_parts():
    gt = _sphere()
    row = evaluate.mesh_row(*gt, gt, samples=2000)
    assert row["chamfer"] < 0.01 and row["f1@0.05"] == pytest.approx(1.0)
    assert row["parts"] == 1 and row["parts_clean"] == 1 and row["watertight"]

    a, b = _sphere(), _sphere(0.1, (0.0, 0.0, 0.0))  # a small shell inside the sphere: the clean-up drops it
    v = np.concatenate([a[0], b[0]])
    f = np.concatenate([a[1], b[1] + len(a[0])])
    row = evaluate.mesh_row(v, f, gt, samples=2000)
    assert row["parts"] == 2 and row["parts_clean"] == 1 and row["watertight"]
    assert "chamfer_clean" not in row
    # cleaned: the same mesh scored as the served library holds it, the inner shell dropped
    row = evaluate.mesh_row(v, f, gt, samples=2000, cleaned=True)
    assert row["chamfer_clean"] < 0.001 < 0.01 < row["chamfer"] and row["f1_clean"] == pytest.approx(1.0)


def test_mesh_row_of_an_empty_mesh():
    row = evaluate.mesh_row(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), _sphere())
    assert row["chamfer"] != row["chamfer"] and row["f1@0.05"] == 0.0 and row["parts"] == 0
    row = evaluate.mesh_row(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), _sphere(), cleaned=True)
    assert row["chamfer_clean"] != row["chamfer_clean"] and row["f1_clean"] == 0.0


def test_summary_counts_parts_watertight_and_wins():
    nan = float("nan")
    rows = [{"name": "x", "set": evaluate.NEW_VIEW, "trained": 0.02, "trained_f1@0.05": 0.9, "trained_parts_clean": 1,
             "trained_watertight": True, "untrained": 0.3},
            {"name": "y", "set": evaluate.NEW_VIEW, "trained": 0.06, "trained_f1@0.05": 0.7, "trained_parts_clean": 3,
             "trained_watertight": False, "untrained": 0.05},
            {"name": "z", "set": evaluate.HELD_OUT, "trained": nan, "untrained": 0.4, "source_structure": 0.2}]
    s = evaluate.summarize(rows)
    new = s[evaluate.NEW_VIEW]
    assert new["trained"] == pytest.approx(0.04) and new["trained_f1"] == pytest.approx(0.8)
    assert new["trained_parts_max"] == 3 and new["trained_watertight"] == 1 and new["trained_better"] == 1
    assert s[evaluate.HELD_OUT]["trained_better"] == 0 and s[evaluate.HELD_OUT]["source_structure"] == pytest.approx(0.2)
    evaluate.print_table(rows)  # renders with missing columns


@pytest.mark.parametrize("latent", ["ss_vae", "pooled"])
def test_training_jobs_run_in_order_and_the_dit_models_the_vae_latents(monkeypatch, tmp_path, latent):
    import threading

    from pipeline import jobs

    submitted, threads = [], {}
    both = threading.Barrier(2, timeout=10)

    def submit(spec, address):
        argv = shlex.split(spec.entrypoint)
        submitted.append(argv)
        if argv[0] == "s2":
            name = argv[argv.index("--name") + 1]
            threads[name] = threading.get_ident()
            if name in ("demo-structure-vae", "demo-vae" if latent == "ss_vae" else "demo-dit"):
                both.wait()  # each chain's first job waits for the other's: they run side by side
            (tmp_path / "runs" / name / "checkpoint_1").mkdir(parents=True)
            (tmp_path / "runs" / name / "checkpoint_1" / "weights.pt").write_bytes(b"")
        return "SUCCEEDED"

    monkeypatch.setattr(jobs, "submit", submit)
    steps = {"structure-vae": 1, "structure-dit": 2, "vae": 3, "dit": 4}
    ckpt = demo.train_debug_networks(tmp_path / "dataset", tmp_path / "runs", 64, steps, "http://x", latent=latent)
    stats = "pipeline.train.latents"

    def job(argv):  # the network a job trains, or whose latent statistics it computes
        return argv[argv.index("--network") + 1].replace("_", "-") + " stats" if argv[2] == stats else argv[2]

    structure = [a for a in submitted if job(a).startswith("structure")]
    sparse = [a for a in submitted if not job(a).startswith("structure")]
    assert [job(a) for a in structure] == ["structure-vae", "structure-vae stats", "structure-dit"]
    assert [job(a) for a in sparse] == (["vae", "vae stats", "dit"] if latent == "ss_vae" else ["dit"])
    assert threads["demo-structure-vae"] != threads["demo-dit"]
    for argv in submitted:
        if argv[0] == "s2":  # one thread each: half a CPU reserved, so two leave one for their data tasks
            assert float(argv[argv.index("--cpus-per-worker") + 1]) == demo.CHAIN_CPUS == 0.5
    scaled, structure_dit = structure[1], structure[2]
    dit = sparse[-1]
    # the structure VAE's dense convolutions: bfloat16 autocast where AMX is (test_train_resume.py)
    assert structure[0][structure[0].index("--cpu-conv-precision") + 1] == demo.VAE_CONV_PRECISION
    # the structure DiT and the cascade read the structure VAE with its latent scale
    assert scaled[3].endswith("checkpoint_1")
    assert ckpt["structure_vae"] == scaled[scaled.index("--out") + 1]
    assert structure_dit[structure_dit.index("--structure-vae") + 1] == ckpt["structure_vae"]
    for argv in (dit, structure_dit):
        assert argv[argv.index("--image-encoder") + 1] == demo.IMAGE_ENCODER
        # their linear layers in bfloat16 where the CPU has AMX or AVX-512 BF16 (test_cpu_precision.py)
        assert argv[argv.index("--cpu-dit-precision") + 1] == demo.DIT_PRECISION == "auto"
    if latent == "ss_vae":  # the SS-DiT and the cascade read the VAE with its latent scale
        vae, scaled = sparse[0], sparse[1]
        assert scaled[3].endswith("checkpoint_1")
        assert ckpt["vae"] == scaled[scaled.index("--out") + 1]
        assert dit[dit.index("--latent") + 1] == ckpt["vae"]
        assert vae[vae.index("--token-budget") + 1] == str(demo.VAE_TOKEN_BUDGET)
        assert vae[vae.index("--oversize") + 1] == "alone" and vae[vae.index("--steps") + 1] == "3"
        assert vae[vae.index("--lr-schedule") + 1] == demo.VAE_LR_SCHEDULE
        assert float(vae[vae.index("--kl-weight") + 1]) == demo.VAE_KL_WEIGHT == 1e-5
        # bfloat16 conv operands only where the trainer's CPU multiplies them in AMX tiles (test_sparse_conv.py)
        assert vae[vae.index("--cpu-conv-precision") + 1] == demo.VAE_CONV_PRECISION == "auto"
    else:
        assert "--latent" not in dit and "vae" not in ckpt


def test_a_job_that_starts_alone_gets_every_thread(monkeypatch, tmp_path):
    """Jobs side by side run one thread each; once the structure chain is done, the sparse chain's next jobs
    run ``threads_alone`` threads (OMP_NUM_THREADS in their runtime env)."""
    import threading

    from pipeline import jobs

    threads, structure_done, vae_submitted, file_seen = {}, threading.Event(), threading.Event(), {}
    real_latest = demo.latest_checkpoint

    def latest(runs, name):
        out = real_latest(runs, name)
        if name == "demo-structure-dit":
            structure_done.set()
        return out

    def submit(spec, address):
        argv = shlex.split(spec.entrypoint)
        name = argv[argv.index("--name") + 1] if argv[0] == "s2" else argv[argv.index("--out") + 1].rsplit("/", 1)[-1]
        threads[name] = spec.runtime_env["env_vars"]["OMP_NUM_THREADS"]
        if argv[0] == "s2":  # every trainer follows the threads file
            file_seen[name] = (argv[argv.index("--threads-file") + 1], (tmp_path / "runs" / "demo-threads").read_text())
        if name == "demo-structure-vae":  # both chains have started before either can finish
            assert vae_submitted.wait(10)
        if name == "demo-vae":  # the SS-VAE outlasts the structure chain, as on the 2-core machine
            vae_submitted.set()
            assert structure_done.wait(10)
            # the structure chain's thread returns from its last checkpoint lookup and hands the running SS-VAE
            # trainer the freed cores through the file (written where the chain count drops)
            deadline = time.time() + 10
            while (tmp_path / "runs" / "demo-threads").read_text() != "3\n" and time.time() < deadline:
                time.sleep(0.02)
            file_seen["demo-vae, structure chain done"] = (None, (tmp_path / "runs" / "demo-threads").read_text())
        if argv[0] == "s2":
            (tmp_path / "runs" / name / "checkpoint_1").mkdir(parents=True)
            (tmp_path / "runs" / name / "checkpoint_1" / "weights.pt").write_bytes(b"")
        return "SUCCEEDED"

    monkeypatch.setattr(jobs, "submit", submit)
    monkeypatch.setattr(demo, "latest_checkpoint", latest)
    steps = {"structure-vae": 1, "structure-dit": 1, "vae": 1, "dit": 1}
    demo.train_debug_networks(tmp_path / "dataset", tmp_path / "runs", 64, steps, "http://x", threads_alone=3)
    assert threads == {"demo-structure-vae": "1", "demo-vae": "1", "demo-structure-vae-latents": "1",
                       "demo-structure-dit": "1", "demo-vae-latents": "3", "demo-dit": "3"}
    path = str(tmp_path / "runs" / "demo-threads")
    assert file_seen["demo-structure-vae"] == (path, "1\n") and file_seen["demo-vae"] == (path, "1\n")
    assert file_seen["demo-vae, structure chain done"] == (None, "3\n") and file_seen["demo-dit"] == (path, "3\n")
    ckpts = {k: str(tmp_path / "runs" / k) for k in ("structure_vae", "structure_dit", "vae", "dit")}
    cfg = demo.write_serve_config(tmp_path / "serve.yaml", ckpts, 64, torch_threads=3)
    import yaml

    from pipeline.config import from_dict
    from pipeline.serve.config import ServeConfig

    args = yaml.safe_load((tmp_path / "serve.yaml").read_text())["applications"][0]["args"]
    assert from_dict(ServeConfig, args, where="test").torch_threads == 3 and cfg["device"] == "cpu"


def test_a_failed_chain_is_named_after_the_other_finishes(monkeypatch, tmp_path):
    from pipeline import jobs

    finished = []

    def submit(spec, address):
        argv = shlex.split(spec.entrypoint)
        if argv[0] == "s2" and argv[2] == "structure-vae":
            return "FAILED"
        if argv[0] == "s2":
            ckpt = tmp_path / "runs" / argv[argv.index("--name") + 1] / "checkpoint_1"
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "weights.pt").write_bytes(b"")
            finished.append(argv[2])
        return "SUCCEEDED"

    monkeypatch.setattr(jobs, "submit", submit)
    steps = {"structure-vae": 1, "structure-dit": 1, "vae": 1, "dit": 1}
    with pytest.raises(RuntimeError, match="training structure-vae: job FAILED"):
        demo.train_debug_networks(tmp_path / "dataset", tmp_path / "runs", 64, steps, "http://x")
    assert finished == ["vae", "dit"]


def test_one_cpu_is_a_named_error_before_anything_runs(tmp_path):
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--num-cpus", "1", "--data", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="--num-cpus 1: training needs at least 2 CPUs"):
        demo._run(args)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("vae_model,dit_model", [("debug", "debug"), ("debug_r4", "debug_grid16")])
def test_vae_model_picks_the_ss_vae_and_its_ss_dit(monkeypatch, tmp_path, vae_model, dit_model):
    from pipeline import jobs

    submitted = []

    def submit(spec, address):
        argv = shlex.split(spec.entrypoint)
        submitted.append(argv)
        if argv[0] == "s2":
            ckpt = tmp_path / "runs" / argv[argv.index("--name") + 1] / "checkpoint_1"
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "weights.pt").write_bytes(b"")
        return "SUCCEEDED"

    monkeypatch.setattr(jobs, "submit", submit)
    steps = {"structure-vae": 1, "structure-dit": 1, "vae": 1, "dit": 1}
    demo.train_debug_networks(tmp_path / "dataset", tmp_path / "runs", 64, steps, "http://x", vae_model=vae_model)
    last_model = lambda argv: [argv[i + 1] for i, a in enumerate(argv) if a == "--model"][-1]  # noqa: E731
    by_net = {a[2]: a for a in submitted if a[0] == "s2"}
    assert last_model(by_net["vae"]) == vae_model and last_model(by_net["dit"]) == dit_model
    assert last_model(by_net["structure-dit"]) == "debug_grid"
    from pipeline.cli import build_parser

    assert build_parser().parse_args(["demo", "--vae-model", vae_model]).vae_model == vae_model
    defaults = build_parser().parse_args(["demo"])
    assert (defaults.vae_model, defaults.views) == ("debug_r4", 32)  # docs/demo.md: the measured better pair
    submitted.clear()  # pooled latents have no SS-VAE grid: the plain debug SS-DiT
    demo.train_debug_networks(tmp_path / "dataset", tmp_path / "runs", 64, steps, "http://x", latent="pooled",
                              vae_model=vae_model)
    by_net = {a[2]: a for a in submitted if a[0] == "s2"}
    assert "vae" not in by_net and last_model(by_net["dit"]) == "debug"


def test_latent_calibration_gives_unit_spread(monkeypatch, tmp_path):
    import dataclasses
    from types import SimpleNamespace

    import torch

    from model.cascade import load_network
    from model.sdf_shapes import AnalyticShape, narrow_band
    from model.vae import SparseSDFVAE, VAEConfig
    from pipeline import shards
    from pipeline.train import latents

    torch.manual_seed(0)
    cfg = VAEConfig.named("tiny")
    vae = SparseSDFVAE(cfg)
    torch.nn.init.normal_(vae.encoder.out_layer.weight, std=0.3)  # a fresh encoder's latents are all zero
    ckpt = tmp_path / "run" / "checkpoint_1"
    ckpt.mkdir(parents=True)
    torch.save({"network": "vae", "model_config": repr(cfg), "resolution": 32, "step": 1,
                "state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, ckpt / "weights.pt")
    samples = []
    for kind, params in (("sphere", (0.6,)), ("torus", (0.5, 0.2))):
        c, v = narrow_band(AnalyticShape(kind, params), 32)
        samples.append(SimpleNamespace(coords=c, values=v, resolution=32))
    monkeypatch.setattr(shards, "read_samples", lambda *a, **k: iter(samples))

    out = tmp_path / "calibrated"
    stats = latents.calibrate(str(ckpt), "unused", 32, str(out))
    assert stats["shapes"] == 2 and stats["std"] > 0
    for source in (str(out), str(out / "model")):  # the trainer's layout and the checkpoint folder
        loaded = load_network(source, "vae")
        assert loaded.config.latents_scale == pytest.approx(1 / stats["std"])
        assert loaded.config.latents_shift == pytest.approx(stats["mean"])
    from pipeline.train.checkpoints import load_weights, model_config_of

    trained_on = model_config_of(load_weights(str(out), "vae"), VAEConfig)  # what the SS-DiT task reads
    assert trained_on == dataclasses.replace(cfg, latents_scale=1 / stats["std"], latents_shift=stats["mean"])
    z = []
    for s in samples:
        from model.sparse import SparseTensor

        x = SparseTensor.from_unsorted(torch.cat([torch.zeros_like(s.coords[:, :1]), s.coords], 1).int(),
                                       s.values.float()[:, None], 32, 1)
        m = load_network(str(out), "vae").module
        z.append(m.scale(m.encode(x, sample=False)[1]).flatten())
    z = torch.cat(z)
    assert float(z.std()) == pytest.approx(1.0, rel=1e-3) and abs(float(z.mean())) < 1e-4


def test_structure_latent_calibration_gives_unit_spread(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import torch

    from model.cascade import load_network
    from model.sdf_shapes import AnalyticShape, narrow_band
    from model.structure import StructureVAE, StructureVAEConfig
    from pipeline import shards
    from pipeline.train import latents
    from pipeline.train.checkpoints import load_weights
    from pipeline.train.config import TrainConfig
    from pipeline.train.tasks import build_task

    torch.manual_seed(0)
    cfg = StructureVAEConfig.named("debug")
    vae = StructureVAE(cfg)
    ckpt = tmp_path / "run" / "checkpoint_1"
    ckpt.mkdir(parents=True)
    torch.save({"network": "structure_vae", "model_config": repr(cfg), "resolution": 64, "step": 1,
                "state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, ckpt / "weights.pt")
    samples = [SimpleNamespace(mesh_id=kind, coords=narrow_band(AnalyticShape(kind, p), 64)[0],
                               values=None, resolution=64, views=[])
               for kind, p in (("sphere", (0.6,)), ("torus", (0.5, 0.2)))]
    monkeypatch.setattr(shards, "read_samples", lambda *a, **k: iter(samples))
    out = tmp_path / "calibrated"
    stats = latents.calibrate(str(ckpt), "unused", 64, str(out), network="structure_vae")
    assert stats["shapes"] == 2
    for source in (str(out), str(out / "model")):  # what the cascade decodes with
        loaded = load_network(source, "structure_vae").config
        assert (loaded.latents_scale, loaded.latents_shift) == pytest.approx((1 / stats["std"], stats["mean"]))
    task = build_task(TrainConfig(network="structure_dit", model="debug", structure_vae=str(out), cond_drop=0.0), 0,
                      frozen_weights=load_weights(str(out), "structure_vae"))
    x0 = task.collate([task.prepare(s) for s in samples], "cpu", torch.float32)["x0"]  # what the flow models
    assert float(x0.std()) == pytest.approx(1.0, rel=1e-3) and abs(float(x0.mean())) < 1e-4


def test_tiny_pixels_encoder_keeps_each_patch_of_the_silhouette():
    import torch

    from model.condition import build_image_encoder

    tiny, pixels = build_image_encoder("tiny"), build_image_encoder("tiny-pixels")
    img = torch.ones(1, 3, 64, 64)
    img[:, :, 8:16, 24:32] = 0.0  # one black 8×8 patch on white: patch (row 1, column 3)
    tokens = pixels(img)
    assert pixels.dim == tiny.dim + 64 and tokens.shape == (1, 64, pixels.dim)
    assert torch.equal(tokens[..., :tiny.dim], tiny(img))  # the tiny encoder's tokens, unchanged
    pix = tokens[0, :, tiny.dim:]
    assert torch.allclose(pix[8 + 3], torch.ones(64)) and torch.allclose(pix[torch.arange(64) != 11], -torch.ones(63, 64))


def test_the_demo_encoder_reads_32_squared_in_4x4_patches():
    import torch

    from model.condition import build_image_encoder

    enc = build_image_encoder(demo.IMAGE_ENCODER)
    assert demo.IMAGE_ENCODER == "tiny-pixels-32" and enc.image_size == 32 and enc.dim == 64 + 16
    img = torch.ones(1, 3, 64, 64)
    img[:, :, 8:16, 24:32] = 0.0  # one black 8×8 patch at 64² is a 4×4 patch at 32²: row 1, column 3
    pix = enc(img)[0, :, 64:]
    assert pix.shape == (64, 16) and torch.allclose(pix[8 + 3], torch.ones(16))
    assert torch.allclose(pix[torch.arange(64) != 11], -torch.ones(63, 16))


def test_quick_mode_cuts_only_the_defaults():
    import argparse

    from pipeline.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["demo", "--quick", "--vae-steps", "50"])
    assert isinstance(args, argparse.Namespace) and args.quick
    demo.apply_quick(args)
    assert args.vae_steps == 50 and args.train_steps == demo.QUICK["train_steps"]
    assert args.train_resolution == 64 and args.latent == "ss_vae"


def test_a_fresh_ss_vae_decoder_passes_its_signal_to_the_output_layer():
    import torch

    from model.sdf_shapes import AnalyticShape, narrow_band
    from model.sparse import SparseTensor
    from model.vae import SparseSDFVAE, VAEConfig
    from pipeline.train.tasks import signal_preserving_init

    torch.manual_seed(0)
    c, v = narrow_band(AnalyticShape("torus", (0.6, 0.2)), 32)
    x = SparseTensor.from_unsorted(torch.cat([torch.zeros_like(c[:, :1]), c], 1).int(), v[:, None], 32, 1)
    ratios = []
    for init in (False, True):
        vae = SparseSDFVAE(VAEConfig.named("tiny"))
        if init:
            signal_preserving_init(vae)
        with torch.no_grad():
            z = vae.encode(x, sample=False)[0]
            z = z.replace(torch.randn_like(z.feats))  # a latent of unit spread on the shape's latent voxels
            h = vae.decoder.latent_features(z)
            out = vae.decoder.upsample_features(h)
        ratios.append(float(out.feats.std() / h.feats.std()))
    assert ratios[0] < 1e-2 < 5e-2 < ratios[1]  # the release's init loses the signal; the training init keeps it


def test_the_ss_dit_task_encodes_each_shape_once():
    from types import SimpleNamespace

    import torch

    from model.sdf_shapes import AnalyticShape, narrow_band
    from model.vae import SparseSDFVAE, VAEConfig
    from pipeline.train.config import TrainConfig
    from pipeline.train.tasks import SparseDiTTask

    vae = SparseSDFVAE(VAEConfig.named("tiny"))
    calls = []
    encode = vae.encode
    vae.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    task = SparseDiTTask(TrainConfig(network="dit", model="debug", latent="a-vae-checkpoint"), 0, latent_vae=vae)
    c, v = narrow_band(AnalyticShape("sphere", (0.6,)), 32)
    items = [task.prepare(SimpleNamespace(mesh_id=f"s{i}", coords=c, values=v, resolution=32, views=[]))
             for i in range(2)]
    first = task.collate(items, "cpu", torch.float32)
    second = task.collate(items, "cpu", torch.float32)
    assert len(calls) == 2 and torch.equal(first["x0"].feats, second["x0"].feats)
    assert "sdf" not in items[0].data and items[0].data["latent"][1].shape[1] == 16


def test_the_ss_vae_task_keeps_targets_and_trains_a_large_shape_alone():
    from types import SimpleNamespace

    import torch

    from model.sdf_shapes import AnalyticShape, narrow_band
    from model.sparse import SparseTensor
    from model.vae_loss import vae_targets
    from pipeline.train.config import TrainConfig
    from pipeline.train.tasks import SparseVAETask

    c, v = narrow_band(AnalyticShape("sphere", (0.6,)), 32)
    task = SparseVAETask(TrainConfig(network="vae", model="debug", token_budget=len(c) // 2, oversize="alone"), 0)
    items = [task.prepare(SimpleNamespace(mesh_id=f"s{i}", coords=c, values=v, resolution=32, num_voxels=len(c)))
             for i in range(2)]
    assert [i.tokens for i in items] == [len(c) // 2] * 2  # over the budget: a batch of its own (the demo's setting)
    batch = task.collate(items, "cpu", torch.float32)
    ref = vae_targets(SparseTensor.from_samples([c, c], [v.float(), v.float()], 32), 8)
    assert "targets" in items[0].data and torch.equal(batch["targets"].coords, ref.coords)
    assert torch.equal(batch["targets"].values, ref.values) and torch.equal(batch["targets"].is_sharp, ref.is_sharp)


def test_a_fresh_ss_vae_encoder_starts_with_a_latent_above_its_noise():
    import torch

    from model.sdf_shapes import AnalyticShape, narrow_band
    from model.sparse import SparseTensor
    from model.vae import SparseSDFVAE, VAEConfig
    from pipeline.train.tasks import signal_preserving_init

    torch.manual_seed(0)
    c, v = narrow_band(AnalyticShape("torus", (0.6, 0.2)), 32)
    x = SparseTensor.from_unsorted(torch.cat([torch.zeros_like(c[:, :1]), c], 1).int(), v[:, None], 32, 1)
    vae = SparseSDFVAE(VAEConfig.named("tiny"))
    signal_preserving_init(vae)
    with torch.no_grad():
        _, mean, logvar = vae.encode(x, sample=False)
    assert float(mean.std()) > 0.3 and torch.allclose(logvar, torch.full_like(logvar, -4.0))
