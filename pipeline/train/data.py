"""Shards -> Ray Dataset -> samples on each worker -> batches bounded by a token budget.

Sparse shapes differ ~50x in token count, so a batch is "as many shapes as fit in ``token_budget``
tokens", not a fixed number of shapes. A shard whose schema is not ours is skipped and counted before
the run starts; a shape bigger than the budget is skipped and counted with a one-line message.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shards as shard_format
from pipeline import storage

log = logging.getLogger(__name__)


class NoTrainableShapes(ValueError):
    """A worker's share of the data held nothing it could train on (every shape skipped or none at all)."""


@dataclass
class Skipped:
    """What the data path left out, with one line per item saying why."""

    shards: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)


def readable_shards(root: str, resolution: int, storage_options: dict | None = None) -> tuple[list[str], list[str]]:
    """(shards with our schema, one-line errors for the rest)."""
    good, bad = [], []
    for uri in shard_format.list_shards(root, resolution, storage_options=storage_options):
        fs, path = storage.filesystem(uri, storage_options)
        try:
            with fs.open(path, "rb") as f:
                names = pq.read_schema(f).names
        except (OSError, pa.ArrowInvalid) as e:
            bad.append(f"{uri}: not a readable Parquet file ({e})")
            continue
        missing = [n for n in shard_format.SCHEMA.names if n not in names]
        if missing:
            bad.append(f"{uri}: not a shard of this project (missing columns: {', '.join(missing)})")
        else:
            good.append(uri)
    return good, bad


def build_dataset(shards: str, resolution: int, *, synthetic_shapes: int = 16, seed: int = 0,
                  storage_options: dict | None = None):
    """The training rows as a Ray Dataset, and the shards skipped (with why)."""
    import ray.data

    if shards == "synthetic":
        from pipeline.train.synthetic import synthetic_rows

        table = shard_format.rows_to_table(synthetic_rows(synthetic_shapes, resolution, seed=seed))
        return ray.data.from_arrow(table), Skipped()
    good, bad = readable_shards(shards, resolution, storage_options)
    for line in bad:
        log.warning("skipping shard %s", line)
    if not good:
        raise shard_format.ShardError(f"{shards}: no readable shards at resolution {resolution}"
                                      + (f" ({len(bad)} skipped: {bad[0]})" if bad else ""))
    fs, _ = storage.filesystem(good[0], storage_options)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    paths = [storage.filesystem(u, storage_options)[1] for u in good]
    ds = ray.data.read_parquet(paths, filesystem=PyFileSystem(FSSpecHandler(fs)))
    return ds, Skipped(shards=bad)


def iter_samples(batches: Iterable[pa.Table], skipped: Skipped) -> Iterator[shard_format.SparseSDFSample]:
    """Arrow batches (from Ray Data's iter_batches) -> samples; a row that will not convert is counted."""
    for table in batches:
        for i in range(table.num_rows):
            try:
                # A fresh one-row copy: the zero-copy reader reads the nested lists of a row that is a
                # slice of a larger block (as Ray hands them out) past the row's end.
                yield from shard_format.samples_from_table(table.slice(i, 1).take([0]))
            except (KeyError, ValueError, pa.ArrowInvalid, IndexError) as e:
                skipped.shapes.append(f"row {i} of a batch: cannot read ({e})")
                log.warning("skipping row: %s", e)


def token_batches(items: Iterable, budget: int, tokens: Callable[[object], int], name: Callable[[object], str],
                  skipped: Skipped) -> Iterator[list]:
    """Greedy packing: yield lists of items whose token counts sum to at most ``budget``."""
    batch, used = [], 0
    for item in items:
        n = tokens(item)
        if n > budget:
            msg = f"{name(item)}: {n} tokens is more than token_budget {budget}; skipped"
            log.warning(msg)
            skipped.shapes.append(msg)
            continue
        if batch and used + n > budget:
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += n
    if batch:
        yield batch


def _nbytes(obj) -> int:
    if hasattr(obj, "untyped_storage"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if hasattr(obj, "data") and isinstance(getattr(obj, "data"), dict):
        return _nbytes(obj.data)
    return 64


class EpochCache:
    """Keeps a worker's prepared items in memory when they all fit in ``max_bytes``.

    Each pass over a Ray Dataset starts a new execution (seconds of fixed cost); with a small dataset
    that cost would dominate every epoch, so later epochs replay the cache in a new order instead.
    """

    def __init__(self, max_bytes: int, seed: int):
        import random

        self.max_bytes, self.rng = max_bytes, random.Random(seed)
        self.items: list = []
        self.bytes, self.complete, self.overflow = 0, False, max_bytes <= 0

    def epoch(self, fresh: Iterable) -> Iterator:
        if self.complete:
            order = list(self.items)
            self.rng.shuffle(order)
            yield from order
            return
        for item in fresh:
            if not self.overflow:
                self.bytes += _nbytes(item)
                if self.bytes > self.max_bytes:
                    self.overflow, self.items = True, []
                else:
                    self.items.append(item)
            yield item
        # Only a pass that ran to its end holds every item.
        self.complete = not self.overflow and bool(self.items)
