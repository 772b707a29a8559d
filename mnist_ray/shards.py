"""Moved to `mnist_ray.formats.shards`; this name stays because scripts written against the
documented reader (`mnist_ray.shards.read_table`) still import it."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("mnist_ray.formats.shards")
