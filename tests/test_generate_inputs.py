"""Where the batch job's images come from: a folder, a Parquet/CSV manifest, an s3:// prefix (no Ray needed)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from pipeline.generate import GenerateConfig, item_key, list_items, model_id, read_source, redact


def test_folder_and_manifests(tmp_path):
    (tmp_path / "imgs").mkdir()
    for n in ("b.png", "a.JPG", "c.txt", ".hidden.png"):
        (tmp_path / "imgs" / n).write_bytes(b"x")
    items = list_items(GenerateConfig(images=str(tmp_path / "imgs"), output="o", seed=5))
    assert [i.name for i in items] == ["a", "b"] and {i.seed for i in items} == {5}
    pq.write_table(pa.table({"image": ["imgs/b.png", "imgs/a.JPG"], "seed": [1, 2]}), tmp_path / "m.parquet")
    items = list_items(GenerateConfig(images=str(tmp_path / "m.parquet"), output="o", limit=1))
    assert len(items) == 1 and items[0].source == str(tmp_path / "imgs" / "b.png") and items[0].seed == 1
    (tmp_path / "bad.csv").write_text("path\nx.png\n")
    with pytest.raises(ConfigError, match="bad.csv: manifest has no 'image' column"):
        list_items(GenerateConfig(images=str(tmp_path / "bad.csv"), output="o"))
    with pytest.raises(ConfigError, match="no images"):
        list_items(GenerateConfig(images=str(tmp_path / "imgs" / "c.txt"), output="o"))


def test_s3_prefix(s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    s3.create_bucket(Bucket="concepts")
    for k in ("set1/chair.png", "set1/lamp.webp", "set1/readme.md"):
        s3.put_object(Bucket="concepts", Key=k, Body=b"img:" + k.encode())
    items = list_items(GenerateConfig(images="s3://concepts/set1", output="o"))
    assert [i.source for i in items] == ["s3://concepts/set1/chair.png", "s3://concepts/set1/lamp.webp"]
    assert read_source(items[0], {}) == b"img:set1/chair.png"


def test_keys_and_redaction():
    info = {"resolution": 512, "networks": {"dit": {"step": 3}}, "device": "cuda:0"}
    assert model_id(info) == model_id({**info, "device": "cpu"}) != model_id({**info, "resolution": 1024})
    assert item_key("ab", 1, "m") != item_key("ab", 2, "m")
    assert redact("https://user:secret@host/a.png") == "https://host/a.png"
