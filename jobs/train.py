"""Ray job entrypoint for `mnist-ray train`: the same flags, e.g.

    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/shards --output s3://bucket/model
"""

import sys

from mnist_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
