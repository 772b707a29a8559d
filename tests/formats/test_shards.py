"""The image-shard format's digests: rows for the fingerprint, ids for reconciliation."""

import pyarrow as pa
import pytest

from mnist_ray.formats import shards
from mnist_ray.inference import infer
from mnist_ray.errors import MnistRayError


def _digest(*chunks) -> shards.IdDigest:
    digest = shards.IdDigest()
    for chunk in chunks:
        digest.add(pa.array(chunk, pa.string()))
    return digest


def test_the_id_digest_ignores_order_and_files_but_not_a_lost_or_repeated_id():
    ids = [f"test-{i:05d}" for i in range(1000)]
    whole = _digest(ids)
    assert _digest(ids[600:], ids[:600][::-1]) == whole  # other files, other order
    assert whole.rows == 1000
    infer.reconcile(whole, _digest(ids[::-1]))
    with pytest.raises(MnistRayError, match="1,000 input rows, 999 output rows"):
        infer.reconcile(whole, _digest(ids[1:]))
    # the same count, one id lost and another written twice
    with pytest.raises(MnistRayError, match="as many rows, but not the same ids"):
        infer.reconcile(whole, _digest(ids[1:] + ids[5:6]))


def test_the_row_digest_xor_ignores_order_and_sees_every_stored_field():
    table = pa.table({"id": ["a", "b"], "image": [b"1", b"2"], "label": pa.array([1, 2], pa.int8()),
                      "split": ["train", "val"]})
    d = shards.row_digests(table)
    assert d.shape == (2, 32)
    assert (shards.xor_digest([d]) == shards.xor_digest([d[1:], d[:1]])).all()
    other = shards.row_digests(table.set_column(2, "label", pa.array([1, 3], pa.int8())))
    assert (other[0] == d[0]).all() and not (other[1] == d[1]).all()


def test_shards_are_read_by_the_manifest_in_four_blocks_per_file_in_the_row_form(small_shards):
    """read_dataset: one read task per listed file (no sampling task of Ray's Parquet reader),
    four blocks each, image as bytes (the row form) and exactly read_table's rows."""
    import ray

    _, manifest = shards.open_shards(small_shards)
    ds = shards.read_dataset(small_shards, columns=["id", "image", "pixels", "label"], num_cpus=0.25)
    blocks = [m.num_rows for bundle in ds.iter_internal_ref_bundles() for m in bundle.metadata]
    assert len(blocks) == shards.READ_BLOCKS_PER_FILE * len(manifest["files"]) and sum(blocks) == manifest["rows"]
    assert [line.split(":")[0] for line in ds.stats().splitlines() if line.startswith("Operator")] == [
        f"Operator 1 ReadShards->SplitBlocks({shards.READ_BLOCKS_PER_FILE})"]
    got = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("id")
    want = shards.read_table(small_shards, columns=["id", "image", "pixels", "label"]).sort_by("id")
    assert got.schema.field("image").type == pa.binary() and got.equals(want.select(got.column_names))
