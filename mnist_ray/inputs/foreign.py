"""Parquet mnist-ray did not write, planned: its columns found, its row groups as read pieces."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import pyarrow as pa
import pyarrow.fs as pafs

from mnist_ray.errors import MnistRayError
from mnist_ray.inputs import files as input_files
from mnist_ray.inputs.columns import Columns, describe_schema, detect, parse_shape
from mnist_ray.inputs.rows import ROW_FORM, to_rows

PIECE_ROWS = 20_000  # row groups are merged into read pieces of about this many rows


@dataclass(frozen=True)
class RowGroupPiece:
    """Row groups ``row_groups`` of one file, whose first row is row ``first_row`` of the file."""

    path: str
    file_id: str
    row_groups: tuple[int, ...]
    first_row: int
    rows: int
    bytes: int
    # The file's own pixel shape: Ray writes each block with a fixed shape when its images
    # share one, so the files of one read_images differ.
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ParquetInput:
    """A foreign Parquet input, planned: its files, columns, pieces, rows and fingerprint."""

    uri: str
    files: input_files.FileSet
    columns: Columns
    pieces: tuple[RowGroupPiece, ...]
    rows: int
    fingerprint: str

    def read_piece(self, piece: RowGroupPiece, encode: bool = False) -> Iterable[pa.Table]:
        """The rows of one piece (what a Ray read task runs)."""
        return read_piece(piece, self.files.root.fs, self.columns, encode)

    def sample(self, n: int = 8) -> pa.Table | None:
        """The first rows, converted in the driver (infer's smoke test)."""
        if not self.pieces:
            return None
        import pyarrow.parquet as pq

        first = self.pieces[0]
        with self.files.root.fs.open_input_file(first.path) as f:
            table = pq.ParquetFile(f).read_row_group(first.row_groups[0], columns=self.columns.read_columns())
        columns = dataclasses.replace(self.columns, shape=first.shape)
        return to_rows(table.slice(0, n), columns, first.file_id, first.first_row, encode=False)

    def ids(self) -> Iterable[pa.Array]:
        """Every row's id, one piece at a time (reconciliation)."""
        import pyarrow.parquet as pq

        for piece in self.pieces:
            if self.columns.id:
                with self.files.root.fs.open_input_file(piece.path) as f:
                    t = pq.ParquetFile(f).read_row_groups(list(piece.row_groups), columns=[self.columns.id])
                yield t[self.columns.id].cast(pa.string())
            else:
                yield pa.array([f"{piece.file_id}#{piece.first_row + i}" for i in range(piece.rows)], pa.string())

    def dataset(self, encode: bool = False, num_cpus: float | None = None):
        """The streaming Ray Dataset of the input's rows in the row form."""
        import functools

        from mnist_ray.formats import readers

        # Each task gets its piece and a few small arguments, not the whole plan.
        read = functools.partial(read_piece, fs=self.files.root.fs, columns=self.columns, encode=encode)
        return readers.read_pieces(self.pieces, read, "ForeignParquet", ROW_FORM, num_cpus=num_cpus)


def read_piece(piece: RowGroupPiece, fs: pafs.FileSystem, columns: Columns, encode: bool) -> Iterable[pa.Table]:
    """One piece's row groups, in the row form (runs in a Ray read task)."""
    import pyarrow.parquet as pq

    with fs.open_input_file(piece.path) as f:
        table = pq.ParquetFile(f).read_row_groups(list(piece.row_groups), columns=columns.read_columns())
    yield to_rows(table, dataclasses.replace(columns, shape=piece.shape), piece.file_id, piece.first_row,
                  encode=encode)


def open_parquet(uri: str, *, image_column: str | None = None, id_column: str | None = None,
                 label_column: str | None = None, image_shape: str | None = None) -> ParquetInput:
    """Plan the read of any image Parquet at ``uri`` (a file, a directory, a glob): a one-line
    error when it has no usable image column, the files disagree, or the choice is ambiguous."""
    import pyarrow.parquet as pq

    files = input_files.list_files(uri)
    shape = parse_shape(image_shape)
    columns, pieces, rows = None, [], 0
    for info in files.files:
        try:
            with files.root.fs.open_input_file(info.path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowInvalid) as e:
            raise MnistRayError(f"{info.path} is not a readable Parquet file ({str(e).splitlines()[0]})") from e
        try:
            found = detect(schema, image_column=image_column, id_column=id_column, label_column=label_column,
                           image_shape=shape)
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # a schema no rule here expected
            raise MnistRayError(f"{files.rel(info)}: columns not understood ({describe_schema(schema)}): "
                                f"{type(e).__name__}: {e}") from e
        if columns is None:
            columns = found
        elif dataclasses.replace(found, shape=None) != dataclasses.replace(columns, shape=None):
            theirs, ours = (f"{c.image}/{c.id}/{c.label}" for c in (found, columns))
            raise MnistRayError(f"{files.rel(info)} has other columns than {files.rel(files.files[0])} "
                                f"(image/id/label {theirs} vs {ours}): give files of one layout")
        start, group, group_rows, group_bytes, first = 0, [], 0, 0, 0
        for i in range(meta.num_row_groups):
            rg = meta.row_group(i)
            if group and group_rows + rg.num_rows > PIECE_ROWS:
                pieces.append(RowGroupPiece(info.path, files.rel(info), tuple(group), first, group_rows, group_bytes,
                                    found.shape))
                group, group_rows, group_bytes = [], 0, 0
            if not group:
                first = start
            group.append(i)
            group_rows += rg.num_rows
            group_bytes += rg.total_byte_size
            start += rg.num_rows
        if group:
            pieces.append(RowGroupPiece(info.path, files.rel(info), tuple(group), first, group_rows, group_bytes,
                                    found.shape))
        rows += meta.num_rows
    settings = {"image": columns.image, "id": columns.id, "label": columns.label, "shape": columns.shape}
    return ParquetInput(uri, files, columns, tuple(pieces), rows, input_files.listing_fingerprint("parquet", files, settings))

