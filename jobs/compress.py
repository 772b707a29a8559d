"""Ray job entrypoint for `mnist-ray compress`: the same flags. From the repo root:

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/compress.py --model s3://bucket/mnist/model --output s3://bucket/mnist/compressed
"""

import sys
from pathlib import Path

# The code shipped with the job (runtime_env working_dir) wins over any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
