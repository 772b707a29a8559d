"""Ray job entrypoint for `mnist-ray infer`: the same flags, e.g.

    ray job submit --working-dir . -- python jobs/infer.py --model s3://bucket/model --input s3://bucket/shards --output s3://bucket/predictions
"""

import sys

from mnist_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
