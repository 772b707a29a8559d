"""Ray job entrypoint for `mnist-ray tune`: the same flags. From the repo root:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/tune.py --data s3://bucket/mnist/shards --output s3://bucket/mnist/search --trials 8 --time-budget 1800
"""

import sys
from pathlib import Path

# The code shipped with the job (runtime_env working_dir) wins over any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
