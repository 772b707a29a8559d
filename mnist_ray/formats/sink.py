"""The Ray Data sink that writes image shards and reports what it wrote to the driver.

Imported only where Ray is in use (it subclasses ``ray.data.Datasink``), so importing the
rest of the package never imports Ray (see ``cluster.connect``). Each write task streams its
blocks into files of at most ``rows_per_file`` rows (or ``max_file_bytes``), named after the
run, and returns a small report (files, rows, and what ``select`` adds: counts, rejected
files, row digests) that the driver merges into the manifest without reading the data again.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from mnist_ray.formats import shards
from mnist_ray.plumbing import storage


class ParquetPartSink(Datasink):
    def __init__(self, loc: storage.Location, run_id: str, schema: pa.Schema, rows_per_file: int,
                 max_file_bytes: int = 256 << 20):
        self.loc, self.run_id, self.schema = loc, run_id, schema
        self.rows_per_file, self.max_file_bytes = rows_per_file, max_file_bytes
        self.results: list[dict] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def select(self, table: pa.Table) -> tuple[pa.Table, dict]:
        """The rows to store, and a report on the block (override: counts, rejects...)."""
        return table, {}

    def write(self, blocks: Iterable, ctx) -> dict:
        files, reports = [], []
        writer, name, rows, nbytes = None, None, 0, 0

        def close():
            writer.close()
            files.append({"path": name, "rows": rows,
                          "bytes": self.loc.fs.get_file_info(self.loc.join(name)).size})

        for block in blocks:
            table, report = self.select(BlockAccessor.for_block(block).to_arrow())
            reports.append(report)
            table = table.select(self.schema.names).cast(self.schema)
            while table.num_rows:
                if writer is not None and (rows >= self.rows_per_file or nbytes >= self.max_file_bytes):
                    close()
                    writer = None
                if writer is None:
                    name = f"part-{self.run_id}-{ctx.task_idx:05d}-{len(files):03d}.parquet"
                    writer = pq.ParquetWriter(self.loc.join(name), self.schema, filesystem=self.loc.fs)
                    rows, nbytes = 0, 0
                piece = table.slice(0, self.rows_per_file - rows)
                table = table.slice(piece.num_rows)
                writer.write_table(piece)
                rows += piece.num_rows
                nbytes += piece.nbytes
        if writer is not None:
            close()
        return {"files": files, "reports": reports}

    def on_write_complete(self, write_result) -> None:
        self.results = [r for r in write_result.write_returns if r]

    def files(self) -> list[dict]:
        return sorted((f for r in self.results for f in r["files"]), key=lambda f: f["path"])

    def reports(self) -> list[dict]:
        return [rep for r in self.results for rep in r["reports"]]


class ShardSink(ParquetPartSink):
    """Writes shards of at most ``rows_per_shard`` rows; rows with a non-null ``error`` column are
    not stored but reported (id, path, error) for the manifest, with counts and row digests.
    Adds the ``pixels`` column (the model's 28x28 input) to every stored row, and stores
    ``image`` as the HF Image struct, ``class_names`` in the ``huggingface`` metadata."""

    def __init__(self, loc: storage.Location, run_id: str, rows_per_shard: int, max_shard_bytes: int,
                 class_names: list[str] | None = None):
        self.class_names = list(class_names or shards.DIGIT_NAMES)
        super().__init__(loc, run_id, shards.schema_for(self.class_names), rows_per_shard, max_shard_bytes)

    def select(self, table: pa.Table) -> tuple[pa.Table, dict]:
        rejected = []
        if "error" in table.column_names:
            bad = table.filter(table["error"].is_valid())
            rejected = [{"id": i, "path": p, "error": e} for i, p, e in
                        zip(bad["id"].to_pylist(), bad["path"].to_pylist(), bad["error"].to_pylist())]
            table = table.filter(table["error"].is_null())
        # The pixels the model sees, computed once here with inference's own function.
        table, missing = shards.with_pixels(table)
        table = shards.stored_form(table, self.class_names)
        counts = Counter(zip(table["split"].to_pylist(), table["label"].to_pylist()))
        return table, {"rejected": rejected, "xor": shards.xor_digest([shards.row_digests(table)]).tobytes(),
                       "counts": [(s, l, n) for (s, l), n in counts.items()], "pixels_missing": missing}
