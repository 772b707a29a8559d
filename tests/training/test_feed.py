"""The training feed: a Ray Data shard read into tf.data, held in memory or streamed, seeded."""

import dataclasses

import numpy as np
import pytest

from mnist_ray.plumbing import cluster
from mnist_ray.training import feed

cluster.configure_process_env()

ROWS = 1000


@pytest.fixture(scope="module")
def rows_dataset(ray_local):
    """1,000 rows like training's: a 28x28x1 float image whose pixels all equal its label-row id."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    ids = np.arange(ROWS)
    images = np.broadcast_to(ids[:, None, None, None].astype(np.float32), (ROWS, 28, 28, 1)).copy()
    table = pa.table({"image": ArrowTensorArray.from_numpy(images), "label": pa.array(ids, pa.int32())})
    return ray.data.from_arrow([table.slice(i, 250) for i in range(0, ROWS, 250)]).materialize()


def ids_of(ds) -> list[int]:
    return [int(i) for b in ds for i in b["image"][:, 0, 0, 0].numpy()]


def test_plan_holds_rows_in_memory_within_the_budget_and_streams_above_it(rows_dataset):
    small = feed.plan(rows_dataset, workers=2, budget_mb=100)
    assert small.mode == "memory" and small.rows_per_worker == ROWS // 2
    assert small.columns["image"] == ([28, 28, 1], "float32") and small.columns["label"] == ([], "int32")
    assert 1.4 < small.mb_per_worker < 1.6  # 500 rows of 3,136 bytes
    big = feed.plan(rows_dataset, workers=2, budget_mb=1)
    assert big.mode == "stream" and "streamed every epoch" in big.describe()


@pytest.mark.parametrize("budget_mb", [100, 1], ids=["memory", "stream"])
def test_every_row_once_an_epoch_shuffled_by_the_seed(rows_dataset, budget_mb):
    plan = dataclasses.asdict(feed.plan(rows_dataset, workers=1, budget_mb=budget_mb))
    rows = feed.Feed(rows_dataset.iterator(), plan, ["image", "label"])
    assert rows.mode == plan["mode"]
    in_order = ids_of(rows.batches(128, seed=None, drop_remainder=False))
    assert in_order == list(range(ROWS)) or plan["mode"] == "stream" and sorted(in_order) == list(range(ROWS))
    first, again, other = (ids_of(rows.batches(100, seed=s)) for s in (1, 1, 2))
    assert sorted(first) == list(range(ROWS)) and first == again and first != other
    batch = next(iter(rows.batches(64, seed=1)))
    assert batch["image"].shape == (64, 28, 28, 1) and batch["label"].dtype.name == "int32"
    np.testing.assert_array_equal(batch["label"].numpy(), batch["image"][:, 0, 0, 0].numpy())
    assert sum(1 for _ in rows.batches(64, seed=3)) == ROWS // 64  # the partial batch is dropped


def test_a_negative_budget_is_a_clear_error():
    from mnist_ray.errors import MnistRayError
    from mnist_ray.training.train import TrainConfig

    with pytest.raises(MnistRayError, match="--feed-memory-mb -1: give 0"):
        TrainConfig(feed_memory_mb=-1).resolved().validate()


def test_a_feed_of_arrays_in_this_process_is_the_same_pipeline():
    arrays = {"image": np.zeros((10, 28, 28, 1), np.float32), "label": np.arange(10, dtype=np.int32)}
    rows = feed.Feed.from_arrays(arrays)
    assert rows.rows == 10 and sorted(int(i) for b in rows.batches(5, seed=0) for i in b["label"]) == list(range(10))
