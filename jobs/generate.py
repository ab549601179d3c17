"""Entry point for ray job submit: generate bytes from a trained model, streamed to stdout.

ray job submit --working-dir . -- python jobs/generate.py --checkpoint PATH_OR_RUN --prompt TEXT
"""

import sys

from mblm.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
