"""The search space of `mnist-ray tune`: parsed from --space and --models, checked, given to Tune as domains."""

from __future__ import annotations

import json
from typing import Protocol

from mnist_ray.model import models
from mnist_ray.errors import MnistRayError


class SpaceFlags(Protocol):
    """The flags of `mnist-ray tune` that shape the search space (TuneConfig has them)."""
    space: str | None
    models: str | None
    workers: int


# What a search may vary: the TrainConfig fields a trial overrides.
SPACE_KEYS = ("model", "learning_rate", "batch_size", "augment", "width")
DEFAULT_SPACE = {
    "model": ["mlp", "cnn", "default"],
    "learning_rate": {"loguniform": [3e-4, 1e-2]},
    "batch_size": [32, 64, 128],
    "augment": [False, True],
    "width": [0.5, 1.0, 1.5],
}


def parse_space(cfg: SpaceFlags) -> dict:
    """The search space: the default one, updated by --space and --models, checked."""
    space = dict(DEFAULT_SPACE)
    if cfg.space:
        try:
            given = json.loads(cfg.space)
        except json.JSONDecodeError as e:
            raise MnistRayError(f"--space is not valid JSON ({e.msg} at character {e.pos}): "
                                "e.g. '{\"model\": [\"cnn\"], \"batch_size\": [32, 64]}'") from None
        if not isinstance(given, dict):
            raise MnistRayError("--space must be a JSON object mapping keys to values")
        unknown = sorted(set(given) - set(SPACE_KEYS))
        if unknown:
            raise MnistRayError(f"unknown search space key(s) {', '.join(map(repr, unknown))}: "
                                f"the keys are {', '.join(SPACE_KEYS)}")
        space.update(given)
    if cfg.models:
        space["model"] = [m.strip() for m in cfg.models.split(",") if m.strip()]
    for key in SPACE_KEYS:
        _check_values(key, space[key], cfg)
    return space


def values_of(spec) -> list:
    """The values of a space entry: a choice's, a range's bounds, or the one fixed value."""
    if isinstance(spec, dict):
        return list(next(iter(spec.values())))
    return list(spec) if isinstance(spec, list) else [spec]


def _check_values(key: str, spec, cfg: SpaceFlags) -> None:
    if isinstance(spec, dict):
        if (len(spec) != 1 or next(iter(spec)) not in ("loguniform", "uniform")
                or key not in ("learning_rate", "width")):
            raise MnistRayError(f"--space {key!r}: a range is {{\"loguniform\": [LO, HI]}} or "
                                "{\"uniform\": [LO, HI]}, for learning_rate and width only")
        lo_hi = values_of(spec)
        if len(lo_hi) != 2 or not all(isinstance(v, (int, float)) for v in lo_hi) or not 0 < lo_hi[0] < lo_hi[1]:
            raise MnistRayError(f"--space {key!r}: a range needs [LO, HI] with 0 < LO < HI")
        return
    values = values_of(spec)
    if not values:
        raise MnistRayError(f"--space {key!r}: give at least one value")
    for v in values:
        if key == "model":
            models.get_spec(v)  # names the known models when unknown
        elif key == "augment" and not isinstance(v, bool):
            raise MnistRayError(f"--space 'augment': {v!r} is not true or false")
        elif key == "batch_size" and (not isinstance(v, int) or isinstance(v, bool) or v < cfg.workers):
            raise MnistRayError(f"--space 'batch_size': {v!r} is not an integer of at least --workers")
        elif key in ("learning_rate", "width") and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                    or not v > 0):
            raise MnistRayError(f"--space {key!r}: {v!r} is not a positive number")


def to_param_space(space: dict) -> dict:
    """Ray Tune domains, which OptunaSearch turns into Optuna distributions."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        if isinstance(spec, dict):
            kind, (lo, hi) = next(iter(spec.items()))
            out[key] = tune.loguniform(lo, hi) if kind == "loguniform" else tune.uniform(lo, hi)
        else:
            out[key] = tune.choice(values_of(spec))  # one value: still a choice, so Optuna records it
    return out
