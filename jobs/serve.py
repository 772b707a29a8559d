"""Ray job entrypoint for `mnist-ray serve`: the same flags. From the repo root:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/serve.py --address auto --model s3://bucket/mnist/model --host 0.0.0.0 --replicas 1..4

The job serves until `serve shutdown` (or `ray job stop`) and then logs its summary. For a
deployment that outlives any job, write a Serve config instead: `mnist-ray serve --write-config serve.yaml`.
"""

import sys
from pathlib import Path

# The code shipped with the job (runtime_env working_dir) wins over any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
