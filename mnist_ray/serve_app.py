"""Moved to `mnist_ray.serving.serve_app`; this name stays because deployed Serve configs
(`import_path: mnist_ray.serve_app:app_builder`) written before the move still name it."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("mnist_ray.serving.serve_app")
