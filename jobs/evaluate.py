"""Ray job entrypoint for `mnist-ray evaluate`: the same flags. From the repo root:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/evaluate.py --predictions s3://bucket/mnist/predictions --output s3://bucket/mnist/report

evaluate runs in the job's driver alone (no Ray tasks); as a job it runs next to the data.
"""

import sys
from pathlib import Path

# The code shipped with the job (runtime_env working_dir) wins over any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
