import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from pipeline import config
from pipeline.config import ConfigError


@dataclass
class Demo:
    name: str = "x"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    pair: tuple[float, float] = (0.0, 1.0)
    mode: Literal["a", "b"] = "a"
    limit: Optional[int] = None
    flag: bool = False
    opts: dict = field(default_factory=dict)


def test_from_dict_coerces_and_rejects_unknown_keys():
    cfg = config.from_dict(Demo, {"sizes": "4, 8", "pair": [1, 2], "limit": "none", "flag": "yes"})
    assert cfg.sizes == [4, 8] and cfg.pair == (1.0, 2.0) and cfg.limit is None and cfg.flag is True
    with pytest.raises(ConfigError, match="unknown key.*sizez.*valid keys"):
        config.from_dict(Demo, {"sizez": [1]})
    with pytest.raises(ConfigError, match="mode.*'c' is not one of"):
        config.from_dict(Demo, {"mode": "c"})
    with pytest.raises(ConfigError, match="sizes: expected int"):
        config.from_dict(Demo, {"sizes": "1,two"})
    with pytest.raises(ConfigError, match="pair: expected 2 values"):
        config.from_dict(Demo, {"pair": "1,2,3"})


def test_flags_override_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("name: fromfile\nsizes: [3]\n")
    p = argparse.ArgumentParser()
    config.add_arguments(p, Demo)
    cfg = config.from_args(Demo, p.parse_args(["--config", str(tmp_path / "c.yaml"), "--name", "flag",
                                              "--opts", '{"k": 1}']))
    assert cfg.name == "flag" and cfg.sizes == [3] and cfg.opts == {"k": 1}
    (tmp_path / "bad.yaml").write_text("nmae: typo\n")
    with pytest.raises(ConfigError, match="nmae"):
        config.from_args(Demo, p.parse_args(["--config", str(tmp_path / "bad.yaml")]))


def test_preprocess_config_validation():
    from pipeline.preprocess import PreprocessConfig

    ok = config.from_dict(PreprocessConfig, {"input": "a", "output": "b", "resolutions": "64,128"})
    assert ok.resolutions == [64, 128]
    for bad, msg in [({"output": "b"}, "input: required"), ({"input": "a", "output": "b", "resolutions": "60"},
                                                            "multiple of 8"),
                     ({"input": "a", "output": "b", "band": 0}, "band"),
                     ({"input": "a", "output": "b", "elevation": "50,10"}, "elevation")]:
        with pytest.raises(ConfigError, match=msg):
            config.from_dict(PreprocessConfig, bad)
    a = config.from_dict(PreprocessConfig, {"input": "a", "output": "b"})
    b = config.from_dict(PreprocessConfig, {"input": "c", "output": "d", "meshes_per_task": 9})
    c = config.from_dict(PreprocessConfig, {"input": "a", "output": "b", "band": 3})
    assert a.row_config_hash() == b.row_config_hash() != c.row_config_hash()
