"""Shards -> Ray Dataset -> samples on each worker -> batches bounded by a token budget.

Sparse shapes differ ~50x in token count, so a batch is "as many shapes as fit in ``token_budget``
tokens", not a fixed number of shapes. A shard whose schema is not ours is skipped and counted before
the run starts; a shape bigger than the budget is skipped and counted with a one-line message.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shards as shard_format
from pipeline import storage
from pipeline.train.synthetic import synthetic_rows

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


class TooManySkipped(shard_format.ShardError):
    """More of the rows a worker read were bad than ``max_skipped_share`` allows: the data set needs fixing."""


class SkipGuard:
    """Counts rows read and rows skipped as bad; ``check`` stops the run when the bad share passes ``limit``."""

    MIN_ROWS = 20  # before the end of a pass, a share of fewer rows says little

    def __init__(self, limit: float, skipped: Skipped, where: str):
        self.limit, self.skipped, self.where = limit, skipped, where
        self.rows, self.bad = 0, 0

    def count(self, bad: bool) -> None:
        self.rows += 1
        self.bad += bad
        if bad and self.rows >= self.MIN_ROWS:
            self.check()

    def check(self) -> None:
        if self.rows and self.bad / self.rows > self.limit:
            first = next((line for line in self.skipped.shapes if "tokens is more than" not in line), "")
            raise TooManySkipped(f"{self.where}: {self.bad} of {self.rows} rows read were bad "
                                 f"({self.bad / self.rows:.0%} > max_skipped_share {self.limit:.0%}); stopping. "
                                 f"First: {first}")


def _error_row(uri: str, message: str) -> pa.Table:
    cols = {n: pa.nulls(1, shard_format.SCHEMA.field(n).type) for n in shard_format.SCHEMA.names}
    return pa.table({**cols, "s2_shard": pa.array([uri]), "s2_error": pa.array([message])})


def shard_tables(uri: str, storage_options: dict | None = None) -> Iterator[pa.Table]:
    """One table a row group, with columns ``s2_shard`` (the file) and ``s2_error`` (why it is unreadable, else null)."""
    try:
        pf = shard_format._open_parquet(uri, storage_options)
    except shard_format.ShardError as e:
        yield _error_row(uri, str(e))
        return
    for g in range(pf.num_row_groups):
        try:
            t = shard_format.read_row_group(pf, uri, g, shard_format.SCHEMA.names).select(shard_format.SCHEMA.names)
        except shard_format.ShardError as e:
            yield _error_row(uri, str(e))
            continue
        n = t.num_rows
        yield t.append_column("s2_shard", pa.array([uri] * n)).append_column("s2_error", pa.nulls(n, pa.string()))


def _read_row_groups(batch: pa.Table, storage_options: dict | None = None) -> Iterator[pa.Table]:
    """Ray Data map_batches: (shard URI) rows -> those shards' row groups one block each (a shard is
    never held whole in memory), checksums verified."""
    for uri in batch.column("uri").to_pylist():
        yield from shard_tables(uri, storage_options)


def build_dataset(shards: str, resolution: int, *, synthetic_shapes: int = 16, seed: int = 0,
                  storage_options: dict | None = None):
    """The training rows as a Ray Dataset, and the shards skipped (with why).

    The shards are read by our own task (``shard_tables``) rather than ``read_parquet``: each row group
    has its page checksums verified, and a damaged one becomes a row that says so instead of failing
    the whole read. Order is preserved, so a resumed run finds its place in the stream.
    """
    import ray.data

    if shards == "synthetic":
        table = shard_format.rows_to_table(synthetic_rows(synthetic_shapes, resolution, seed=seed))
        return ray.data.from_arrow(table), Skipped()
    good, bad = readable_shards(shards, resolution, storage_options)
    for line in bad:
        log.warning("skipping shard %s", line)
    if not good:
        raise shard_format.ShardError(f"{shards}: no readable shards at resolution {resolution}"
                                      + (f" ({len(bad)} skipped: {bad[0]})" if bad else ""))
    ds = ray.data.from_items([{"uri": u} for u in good], override_num_blocks=min(len(good), 64))
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(_read_row_groups, fn_kwargs={"storage_options": storage_options}, batch_size=1,
                        batch_format="pyarrow")
    return ds, Skipped(shards=bad)


def iter_samples(batches: Iterable[pa.Table], skipped: Skipped, resolution: int | None = None,
                 seen: SkipGuard | None = None) -> Iterator[shard_format.SparseSDFSample]:
    """Arrow batches (from Ray Data's iter_batches) -> checked samples; a bad row is skipped and counted.

    The message of a skipped row names its shard file and mesh; ``seen`` counts rows and bad rows.
    """
    for table in batches:
        for i in range(table.num_rows):
            row = table.slice(i, 1)
            names = row.column_names
            uri = row.column("s2_shard")[0].as_py() if "s2_shard" in names else "(batch)"
            error = row.column("s2_error")[0].as_py() if "s2_error" in names else None
            try:
                if error:
                    raise shard_format.BadRow(error)
                # A fresh one-row copy: the zero-copy reader reads the nested lists of a row that is a
                # slice of a larger block (as Ray hands them out) past the row's end.
                out = shard_format.checked_samples(row.take([0]), uri, resolution)
            except (KeyError, ValueError, pa.ArrowInvalid, IndexError) as e:
                msg = str(e) if isinstance(e, shard_format.ShardError) else f"{uri}: row {i}: cannot read ({e})"
                skipped.shapes.append(msg)
                log.warning("skipping row: %s", msg)
                if seen is not None:
                    seen.count(True)
                continue
            if seen is not None:
                seen.count(False)
            yield from out


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
    """A worker's prepared items, in an order fixed by the epoch alone, kept in memory when they fit.

    Each pass over a Ray Dataset starts a new execution (seconds of fixed cost); with a small dataset
    that cost would dominate every epoch, so later epochs replay the cache in a new order instead.
    Epoch 0 (and every epoch when the items do not fit in ``max_bytes``) runs in the dataset's order;
    epoch e > 0 of a cached dataset in a shuffle seeded by (seed, e). So ``(epoch, position)`` names
    the next item exactly, and a resumed run continues where the checkpoint was taken.
    """

    def __init__(self, max_bytes: int, seed: int):
        self.max_bytes, self.seed = max_bytes, seed
        self.items: list = []
        self.bytes, self.complete, self.overflow = 0, False, max_bytes <= 0

    def _add(self, item) -> None:
        if self.overflow:
            return
        self.bytes += _nbytes(item)
        if self.bytes > self.max_bytes:
            self.overflow, self.items = True, []
        else:
            self.items.append(item)

    def epoch(self, epoch: int, fresh: Callable[[int], Iterable], start: int = 0) -> Iterator[tuple[int, object]]:
        """(position, item) pairs of ``epoch`` from ``start``; ``fresh(skip)`` is a dataset pass without its first items."""
        if epoch > 0 and not self.complete and not self.overflow:
            for item in fresh(0):  # resumed past epoch 0: the cached order needs every item first
                self._add(item)
            self.complete = not self.overflow and bool(self.items)
        if epoch > 0 and self.complete:
            order = list(self.items)
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            yield from enumerate(order[start:], start)
            return
        for pos, item in enumerate(fresh(start), start):
            if start == 0:
                self._add(item)
            yield pos, item
        # Only a pass that ran from its start to its end holds every item.
        self.complete = start == 0 and not self.overflow and bool(self.items)
