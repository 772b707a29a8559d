"""Ray job entrypoint for `mnist-ray prepare`: the same flags, e.g.

    ray job submit --working-dir . -- python jobs/prepare.py --source mnist-sample --output s3://bucket/shards
"""

import sys

from mnist_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
