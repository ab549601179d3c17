"""Entry point for ray job submit.

ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
    python jobs/evaluate.py CONFIG.yaml --checkpoint RUN_ID_OR_PATH [--split test] [--device cuda]
"""

import sys

from mblm.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
