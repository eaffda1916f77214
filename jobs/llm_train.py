"""Fine-tune a causal LM from an LLM config under ``ray job submit``.

    ray job submit --working-dir . -- python jobs/llm_train.py job.yaml \
        [--set hyperparams.learning_rate=1e-4] [--resume latest]

Accepts the same arguments as ``kiln llm train``; exits 1 when the job fails.
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["llm", "train", *sys.argv[1:]]))
