"""Ray Tune callbacks of `mnist-ray tune` (imported only by a running search: this module imports Ray)."""

from __future__ import annotations

import logging

import ray
from ray.tune import Callback

log = logging.getLogger(__name__)


def _train_groups(bundle: dict, workers: int) -> set[str]:
    """Ids of the live placement groups shaped like a trial's Ray Train worker group."""
    want = [bundle] * workers
    return {pg_id for pg_id, info in ray.util.placement_group_table().items()
            if info["state"] in ("CREATED", "PENDING", "RESCHEDULING")
            and [info["bundles"][i] for i in sorted(info["bundles"])] == want}


def _remove(pg_ids: set[str]) -> None:
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id in pg_ids:
        log.info("releasing the worker placement group %s of a stopped trial", pg_id)
        remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))


class ReleaseTrainWorkers(Callback):
    """Releases the CPUs of a trial's Ray Train workers when Tune stops the trial.

    ASHA (and the time budget) stop a trial by ending its actor; the Train controller it
    started dies with it, but the workers' placement group belongs to the job and stays
    reserved. Ray Train's own cleaner needs the state API (the dashboard), which a local
    Ray of this project does not run, so without this every later trial would wait for
    CPUs forever. Trials run one at a time: a worker-shaped group that appeared while a
    trial ran and outlives it is that trial's.
    """

    def __init__(self, bundle: dict, workers: int):
        self.bundle, self.workers = dict(bundle), workers
        self._before: set[str] = set()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._before = _train_groups(self.bundle, self.workers)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release()

    def _release(self) -> None:
        _remove(_train_groups(self.bundle, self.workers) - self._before)
        self._before = set()

    def on_experiment_end(self, trials, **info):
        self._release()
