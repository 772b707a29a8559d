"""The predictions format: Parquet files written by ``mnist-ray infer``, one row per input row.

Schema (version 2): ``id`` string, ``prediction`` int8, ``class_name`` string (the prediction's
name in the model's ``metadata.json``) and ``confidence`` float32 (null when the
row could not be scored), ``probabilities`` fixed_size_list<float32>[10], ``label`` int8 (null
when unknown), ``path`` string (the source file, for image folders), ``model_version`` string,
``error`` string (null, or why the row could not be scored). Version 1 (no ``class_name``) is
still read: the column comes back null. A dataset is complete when its
``_manifest.json`` (kind ``predictions``: files, rows, input, model, plan) and ``_SUCCESS`` exist.
"""

from __future__ import annotations

import pyarrow as pa

from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError

KIND = "predictions"
SCHEMA_VERSION = 2
NUM_CLASSES = 10
SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prediction", pa.int8()),
    pa.field("class_name", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("probabilities", pa.list_(pa.float32(), NUM_CLASSES)),
    pa.field("label", pa.int8()),
    pa.field("path", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("error", pa.string()),
])
PRODUCER = "mnist-ray infer --model MODEL_DIR --input PATH --output PATH"


def schema_of(columns: list[str] | None) -> pa.Schema:
    """The schema of ``columns`` (all of them when None), in that order."""
    return SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])


def open_predictions(uri: str) -> tuple[storage.Location, dict]:
    """A complete predictions dataset (refuses anything else with a clear message)."""
    loc, manifest = storage.open_dataset(uri, producer=PRODUCER)
    if manifest.get("kind") != KIND:
        raise MnistRayError(f"{uri} holds {manifest.get('kind')!r}, not predictions")
    return loc, manifest


def read_predictions(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A complete predictions dataset as one Arrow table (reports, tests: small data)."""
    import pyarrow.parquet as pq

    loc, manifest = open_predictions(uri)
    tables = []
    for f in manifest["files"]:
        with loc.fs.open_input_file(loc.join(f["path"])) as file:
            stored = pq.ParquetFile(file)
            names = [c for c in (columns or SCHEMA.names) if c in stored.schema_arrow.names]
            table = stored.read(columns=names)
        for name in columns or SCHEMA.names:  # a column later versions added: null in older files
            if name not in table.column_names:
                table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
        tables.append(table.select(columns or SCHEMA.names))
    return pa.concat_tables(tables).cast(schema_of(columns)) if tables else schema_of(columns).empty_table()
