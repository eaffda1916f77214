"""Search hyperparameters from a run file and a space file under ``ray job submit``.

    ray job submit --working-dir . -- python jobs/tune.py examples/digits_mlp.yaml \
        --space examples/tune_space.yaml --samples 8

Accepts the same arguments as ``kiln tune``; joins the cluster the job runs on.
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
