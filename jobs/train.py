"""Train from a run file under ``ray job submit``.

    ray job submit --working-dir . -- python jobs/train.py examples/digits_mlp.yaml --workers 2

Accepts the same arguments as ``kiln train``; joins the cluster the job runs on.
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
