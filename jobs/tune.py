"""Entry point for ray job submit.

ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
    python jobs/tune.py SWEEP.yaml [--set KEY=VALUE ...]
"""

import sys

from mblm.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
