"""The s2 command: help without torch or Ray, per-network training flags, real boolean flags."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import config
from pipeline.cli import build_parser
from pipeline.config import ConfigError


def _modules_after(argv: list[str]) -> dict:
    """Run ``s2 ARGV`` in a fresh interpreter; which heavy modules it imported and its exit code."""
    code = ("import json, sys\nfrom pipeline.cli import main\n"
            f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'ray': 'ray' in sys.modules}),"
            " file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return json.loads(out.stderr.strip().splitlines()[-1]) | {"stdout": out.stdout}


@pytest.mark.parametrize("argv", [["--help"], ["train", "dit", "--help"], ["train", "vae", "--help"],
                                  ["serve", "--help"], ["generate", "--help"], ["submit", "--help"],
                                  ["preprocess", "--help"]])
def test_help_imports_neither_torch_nor_ray(argv):
    got = _modules_after(argv)
    assert got["rc"] == 0 and "usage: s2" in got["stdout"]
    assert not got["torch"] and not got["ray"], got


def _help(*argv: str) -> str:
    parser = build_parser()
    sub = parser
    for name in argv:
        sub = next(a for a in sub._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices[name]
    return sub.format_help()


def test_train_help_is_per_network():
    dit, vae, sdit = _help("train", "dit"), _help("train", "vae"), _help("train", "structure-dit")
    for flag in ("--attention", "--latent", "--cond-drop", "--image-encoder"):
        assert flag in dit and flag not in vae
    assert "--structure-vae" in sdit and "--structure-vae" not in dit and "--attention" not in sdit
    for text in (dit, vae, sdit):
        assert "--use-gpu [true|false], --no-use-gpu" in text and "--network " not in text


def test_every_flag_has_help():
    parser = build_parser()
    stack = [parser]
    seen = 0
    while stack:
        p = stack.pop()
        p.format_help()  # builds the flags of a subcommand made on first use
        for action in p._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                stack.extend(action.choices.values())
            elif action.option_strings and action.help != "==SUPPRESS==":
                seen += 1
                text = (action.help or "").strip()
                assert text and not text.startswith("(default"), f"{p.prog} {action.option_strings[0]} has no help"
    assert seen > 50


@pytest.mark.parametrize("flags,want", [([], False), (["--use-gpu"], True), (["--no-use-gpu"], False),
                                        (["--use-gpu", "true"], True), (["--use-gpu", "false"], False),
                                        (["--use-gpu=yes"], True), (["--use-gpu", "--steps", "3"], True)])
def test_boolean_flags(flags, want):
    from pipeline.commands.train import _config

    args = build_parser().parse_args(["train", "dit", *flags])
    cfg = _config(args)
    assert cfg.use_gpu is want and cfg.network == "dit"


def test_boolean_flag_rejects_other_values(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "dit", "--use-gpu", "maybe"])
    assert "expected a boolean" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "dit", "--no-use-gpu", "true"])


def test_vae_subcommand_keeps_defaults_of_fields_it_hides():
    from pipeline.commands.train import _config

    cfg = _config(build_parser().parse_args(["train", "vae", "--steps", "5"]))
    assert (cfg.network, cfg.steps, cfg.attention, cfg.latent) == ("vae", 5, "full", "pooled")
    with pytest.raises(SystemExit):  # a DiT flag is not a VAE flag
        build_parser().parse_args(["train", "vae", "--attention", "ssa"])
    with pytest.raises(ConfigError, match="contradicts"):  # older specs may still name the network
        _config(build_parser().parse_args(["train", "vae", "--network", "dit"]))


def test_plain_argparse_parser_builds_at_once():
    import argparse
    from dataclasses import dataclass

    @dataclass
    class C:
        flag: bool = True
        n: int = 1

    p = argparse.ArgumentParser()
    config.later(p, lambda p: config.add_arguments(p, C))
    got = config.from_args(C, p.parse_args(["--no-flag", "--n", "4"]))
    assert (got.flag, got.n) == (False, 4)


def test_cluster_up_on_a_busy_port_is_one_line(tmp_path):
    """`s2 cluster up` where something already listens: the port and the flags to change, no Ray traceback."""
    import os
    import socket

    from servers import free_port

    s2 = os.path.join(os.path.dirname(sys.executable), "s2")

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([s2, "cluster", "up", "--port", str(port), "--dashboard-port", str(free_port())],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == (f"s2 cluster up: port {port} (the GCS port, --port) is in use on this machine, by "
                                  f"another Ray cluster or program; pick free ports with --port and --dashboard-port")
