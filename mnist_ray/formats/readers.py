"""One Ray Data read (a Datasource) over inputs planned in pieces, one read task per piece."""

# One Ray Data read for inputs planned in pieces (the files of image shards, row groups of
# foreign Parquet, byte ranges of an archive's members): one read task per piece, rows in the
# project's row form.
#
# A real Read operator, so Ray Data's checkpoint filter (resume) sees the ids the piece's reader
# makes, the same on every run. Imported only where Ray is in use (it subclasses
# ``ray.data.Datasource``), like ``sink``.

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata


class PieceDatasource(Datasource):
    """``read_piece(piece)`` yields Arrow tables; ``pieces`` are small picklable descriptions
    with ``rows`` and ``bytes`` attributes (what the planner measured)."""

    def __init__(self, pieces: Sequence, read_piece: Callable[[object], Iterable[pa.Table]], name: str,
                 schema: pa.Schema):
        super().__init__()
        self.pieces, self.read_piece, self.name, self.schema = list(pieces), read_piece, name, schema

    def get_name(self) -> str:
        return self.name

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(p.bytes for p in self.pieces)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        read_piece = self.read_piece

        def task(piece):
            return ReadTask(lambda: read_piece(piece),
                            BlockMetadata(num_rows=piece.rows, size_bytes=piece.bytes, input_files=None,
                                          exec_stats=None),
                            schema=self.schema, per_task_row_limit=per_task_row_limit)

        return [task(p) for p in self.pieces]


def read_pieces(pieces: Sequence, read_piece: Callable, name: str, schema: pa.Schema, num_cpus: float | None = None,
                override_num_blocks: int | None = None):
    """A streaming Ray Dataset over ``pieces``, one read task each (``override_num_blocks``:
    Ray's, which otherwise splits the tasks' output into 200 blocks or more)."""
    import ray

    return ray.data.read_datasource(PieceDatasource(pieces, read_piece, name, schema), num_cpus=num_cpus,
                                    override_num_blocks=override_num_blocks)
