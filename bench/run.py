"""Entry point of ``make bench``: runs every benchmark module with its defaults.

Each benchmark is a module in ``bench/`` with a ``main(argv) -> int``; add new ones
(generation speed, Ray overhead, ...) to ``BENCHMARKS``. Arguments after the benchmark
name are passed through: ``python bench/run.py train_throughput --quick``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCHMARKS = ["train_throughput", "generate_speed", "ray_overhead"]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks:", ", ".join(BENCHMARKS))
        return 0
    if argv and not argv[0].startswith("-"):
        name, rest = argv[0], argv[1:]
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        selected = [(name, rest)]
    else:
        selected = [(name, list(argv)) for name in BENCHMARKS]
    status = 0
    for name, args in selected:
        print(f"[bench] === {name} ===", file=sys.stderr)
        module = importlib.import_module(name)
        status = max(status, int(module.main(args) or 0))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
