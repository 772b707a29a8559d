"""Resuming infer with Ray Data's checkpoint: the ids already written, kept as sorted 64-bit hashes.

A feature of infer, not a version workaround: Ray's own filter works, but holds every checkpointed
id as a Python string. What Ray's filter actor costs in CPUs is ``compat.checkpoint_filter_cpus``.
"""

from __future__ import annotations

from mnist_ray.formats import shards


def hashed_checkpoint_classes(scheme: str):
    """Ray Data's checkpoint manager and filter with ids kept as sorted 64-bit hashes.

    Ray's own (``NumpyArrayBasedCheckpointFilter``) loads every checkpointed id as a Python
    string in a NumPy object array: ~73 bytes per 16-character id, pickled into every filter
    actor and sorted in one task, so a resumed 100M-row run needs ~7 GB per filter actor plus
    the same again to sort. Hashes are 8 bytes per id, and a uint64 array is read from the
    object store without a copy by every filter actor. A collision (a new id taken for a
    checkpointed one: p ~ n_new * n_done / 2**64) drops a row, which the reconciliation by
    other keys (``shards.IdDigest``) then refuses to publish.

    Files are resumed by the ``path`` column, which holds the file's URI when written, while
    the rows right after the read (where the filter runs) hold the filesystem's path (``b/k``):
    the filter adds ``scheme`` first. Checked on Ray 2.60.0.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    from ray.data.checkpoint.checkpoint_filter import CheckpointFilter, IdColumnCheckpointManager

    class HashedIdCheckpointManager(IdColumnCheckpointManager):
        def _preprocess_data_pipeline(self, checkpoint_ds):
            # Ray then sorts this column into one NumPy array: uint64, not strings.
            return checkpoint_ds.map_batches(hash_id_column, batch_format="pyarrow", batch_size=None,
                                             fn_kwargs={"column": self.id_column})

    class HashedIdCheckpointFilter(CheckpointFilter):
        SCHEME = scheme

        def __init__(self, config, checkpoint_ref):
            super().__init__(config, checkpoint_ref)
            self.done = ray.get(checkpoint_ref)  # sorted uint64, zero-copy from the object store

        def filter_rows_for_block(self, block):
            if len(self.done) == 0 or block.num_rows == 0:
                return block
            ids = block[self.id_column]
            if self.SCHEME:
                ids = pc.binary_join_element_wise(self.SCHEME, ids, "")
            hashes = shards.id_hashes(ids)
            at = np.minimum(np.searchsorted(self.done, hashes), len(self.done) - 1)
            return block.filter(pa.array(self.done[at] != hashes))

    return HashedIdCheckpointManager, HashedIdCheckpointFilter


# Ids hashed at a time when a checkpoint is loaded: hashing goes through one Python string per
# id (~200 bytes each while it runs), and Ray hands the map whole blocks of checkpointed ids.
HASH_SLICE_ROWS = 65_536


def hash_id_column(batch, column: str):
    """A checkpoint file's rows -> its ids' hashes (the manager's map over the checkpoint)."""
    import numpy as np
    import pyarrow as pa

    ids = batch[column]
    hashes = [shards.id_hashes(ids.slice(i, HASH_SLICE_ROWS)) for i in range(0, len(ids), HASH_SLICE_ROWS)]
    return pa.table({column: pa.array(np.concatenate(hashes) if hashes else np.zeros(0, np.uint64), pa.uint64())})


# Ray's default of up to 10 filter actors x 1 GiB reserved is sized for big clusters.
CHECKPOINT_FILTER_ACTORS = 2


def checkpoint_config(id_column: str, path: str, filesystem, scheme: str = ""):
    """Ray Data's ``CheckpointConfig`` for a job that writes under ``path``.

    Kept after success (the driver publishes, then deletes it: a driver that dies between the
    last write and publishing must not rescore everything), with the URI filter above and a
    small filter pool and ids kept as hashes (``hashed_checkpoint_classes``). Ray applies it
    only to plans that run Read -> ... -> Write.
    """
    from ray.data.checkpoint import CheckpointConfig

    manager_cls, filter_cls = hashed_checkpoint_classes(scheme)
    config = CheckpointConfig(id_column=id_column, checkpoint_path=path, override_filesystem=filesystem,
                              checkpoint_manager_cls=manager_cls, checkpoint_filter_cls=filter_cls,
                              delete_checkpoint_on_success=False)
    config.checkpoint_actor_pool_max_size = CHECKPOINT_FILTER_ACTORS
    return config
