"""Entry point for ray job submit.

ray job submit --working-dir . -- python jobs/train.py CONFIG.yaml [--set KEY=VALUE ...]
"""

import sys

from mblm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
