"""The ``mnist-ray`` command: one subcommand per job, flags generated from its config.

Exit codes: 0 success, 1 a user error (one line on stderr, no traceback), 2 bad flags
(argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mnist_ray import __version__, config
from mnist_ray.plumbing import cluster, logs
from mnist_ray.errors import raised_in_worker

# subcommand -> (module, config class, one-line description). Modules load only when used,
# so `mnist-ray --help` does not import Ray or TensorFlow.
COMMANDS = {
    "prepare": ("mnist_ray.preparation.prepare", "PrepareConfig",
                "turn a dataset into Parquet image shards (local or s3://)"),
    "train": ("mnist_ray.training.train", "TrainConfig",
              "train a model with Ray Train (data parallel) and export a versioned model dir"),
    "tune": ("mnist_ray.training.tune", "TuneConfig",
             "search hyperparameters of training (Ray Tune: Optuna + ASHA); results and the best model"),
    "infer": ("mnist_ray.inference.infer", "InferConfig",
              "score shards or image files with a pool of Ray actors; predictions to Parquet"),
    "evaluate": ("mnist_ray.evaluation.evaluate", "EvaluateConfig",
                 "metrics, confusion matrix and a sample grid of a predictions dataset"),
    "pipeline": ("mnist_ray.pipeline", "PipelineConfig",
                 "prepare -> train -> infer -> evaluate, skipping every stage whose output is current"),
    "predict": ("mnist_ray.inference.predict", "PredictConfig",
                "classify a few image files here and now: class and the ten percentages"),
    "bench": ("mnist_ray.bench.bench", "BenchConfig",
              "images/s of batch inference: naive loop, forward-pass ceiling, the whole job; training"),
    "serve": ("mnist_ray.serving.serve", "ServeConfig",
              "the model behind HTTP on Ray Serve (batched), with a page to try it; or a Serve config"),
    "robustness": ("mnist_ray.evaluation.robustness", "RobustnessConfig",
                   "accuracy on inputs not trained on: MNIST test, UCI scans, unseen fonts, phone photos"),
    "compress": ("mnist_ray.training.compress", "CompressConfig",
                 "quantize, prune and distill a model dir; every variant a model dir, compared in one table"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists the subcommands without importing any of them."""
    parser = argparse.ArgumentParser(
        prog="mnist-ray", description="Train a digit classifier and score millions of images on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, _, h) in COMMANDS.items())
        + "\n\nrun `mnist-ray COMMAND --help` for a command's flags")
    parser.add_argument("--version", action="version", version=f"mnist-ray {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def command_parser(name: str):
    """A subcommand's parser (flags from its config dataclass) and its module."""
    module_name, cls_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mnist-ray {name}", description=help_)
    config.add_arguments(parser, getattr(module, cls_name))
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=(
        f"show Ray's and TensorFlow's own logs too (also {logs.VERBOSE_ENV}=1); "
        "the run's log file in OUTPUT/_logs has them either way"))
    return parser, module, getattr(module, cls_name)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="mnist-ray: %(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mnist_ray").setLevel(logging.INFO)
    top = build_parser().parse_args(argv)
    logs.configure(verbose="--verbose" in top.args)  # before any module imports Ray or TensorFlow
    parser, module, cls = command_parser(top.command)
    args = parser.parse_args(top.args)
    try:
        cfg = config.from_args(cls, args)
        print(f"mnist-ray {top.command}: config {config.to_json(cfg)}", file=sys.stderr)
        output = None if getattr(cfg, "list_models", False) else getattr(cfg, "output", None)
        with logs.run_log(top.command, output):
            try:
                summary = module.run(cfg)
            finally:
                cluster.shutdown()
            if isinstance(summary, dict) and logs.current_log():
                summary["log"] = logs.current_log()
    except KeyboardInterrupt:
        print(f"mnist-ray {top.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user errors get one line, bugs a traceback
        user = raised_in_worker(e)
        if user is None:
            raise
        print(f"mnist-ray {top.command}: error: {user}", file=sys.stderr)
        return 1
    print(logs.format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
