"""One entry to every input: the kinds of input, which each command reads, and ``open_input``."""

from __future__ import annotations

from dataclasses import dataclass, field

from mnist_ray.errors import MnistRayError
from mnist_ray.inputs import sources
from mnist_ray.inputs.columns import ColumnChoice

# Every kind of input, by name: adding one is a ``sources.Source`` subclass and a line here.
KINDS: dict[str, type[sources.Source]] = {
    "shards": sources.ShardSource,
    "archive": sources.ArchiveSource,  # before "images": images:PATH of a .zip is an archive
    "parquet": sources.ParquetSource,
    "images": sources.ImageFolderSource,
    "dataset": sources.DatasetSource,
}


@dataclass(frozen=True)
class Command:
    """The kinds a command reads, in the order they are tried; the last is its catch-all.

    ``sniff``: a spec without a kind's prefix is recognised by looking at it (infer's
    ``--input PATH``), else it is the catch-all (prepare's ``--source mnist-sample``).
    """

    kinds: tuple[str, ...]
    sniff: bool
    columns_error: str  # the --image-column ... flags given for an input that is not Parquet


PREPARE = Command(("archive", "parquet", "images", "dataset"), sniff=False,
                  columns_error="--image-column, --id-column, --label-column and --image-shape are for "
                                "--source parquet:PATH")
INFER = Command(("shards", "archive", "parquet", "images"), sniff=True,
                columns_error="--image-column, --id-column, --label-column and --image-shape are for "
                              "Parquet input; {spec} is {kind}")


@dataclass(frozen=True)
class Options:
    """How an input is read: Parquet's columns, a dataset's val split, the model reading it."""

    columns: ColumnChoice = field(default_factory=ColumnChoice)
    model_metadata: dict | None = None  # infer: decides whether shards' stored pixels are usable
    val_fraction: float = 0.1
    seed: int = 0


def kind_of(spec: str, command: Command) -> type[sources.Source]:
    """The kind of input ``spec`` is, among those ``command`` reads."""
    kinds = [KINDS[name] for name in command.kinds]
    named = next((kind for kind in kinds if kind.named_by(spec)), None)
    if named is not None:
        return named
    if command.sniff:
        return next(kind for kind in kinds if kind.claims(spec))
    return kinds[-1]


def open_input(spec: str, command: Command, options: Options = Options()) -> sources.Source:
    """The input ``spec`` names, of the first kind ``command`` reads that it is: a one-line
    error when it is none of them, or when Parquet's flags are given for another kind."""
    kind = kind_of(spec, command)
    if kind is not sources.ParquetSource and options.columns != ColumnChoice():
        raise MnistRayError(command.columns_error.format(spec=spec, kind=kind.kind))
    return kind.open(spec, options)
