"""Time MBLM training steps in the current interpreter; print one JSON line.

This script runs unchanged in either virtual environment (ours: ``.venv``, the reference
PyPI ``mblm`` 0.4.2: ``.venv-ref``). Both packages are imported as ``mblm``, so a process
must only ever see one of them: the driver (``train_throughput.py``) starts one worker
process per measurement. Only the public API (``MBLM``, ``MBLMModelConfig``,
``MBLMReturnType``) and torch are used.

The spec is a JSON object, given as the first argument or on stdin::

    {
      "side": "ours",               # label only, echoed back
      "config": {...},              # the MBLMModelConfig dict for THIS side
      "batch_size": 4,
      "seq_len": 2048,              # bytes per sequence (<= prod(seq_lens))
      "warmup": 2,                  # untimed steps
      "steps": 5,                   # timed steps
      "threads": 2,                 # torch.set_num_threads (default: all cores)
      "seed": 0,
      "mode": "train",              # "train", or "profile" (torch.profiler over the
                                    # timed steps; adds a "profile" table to the output)
      "profile_rows": 30,
      "profile_sort": "self_cpu_time_total"
    }

A training step is: forward with ``return_type=LOSS`` on random byte ids in [0, 256),
backward, ``AdamW(lr=1e-4, betas=(0.9, 0.95))`` step, ``zero_grad``. Each step gets a fresh
random batch (drawn before the clock starts).

Memory: ``peak_rss_bytes`` is the process's peak resident set size (``getrusage``
``ru_maxrss``; the same number as ``VmHWM`` in ``/proc/self/status``), so it includes the
interpreter and torch itself; ``baseline_rss_bytes`` is the RSS after imports, before the
model is built, for reference. (tracemalloc does not see torch's allocations.)
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any


def _current_rss_bytes() -> int | None:
    try:
        import psutil  # optional: not installed in every venv

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _read_spec(argv: list[str]) -> dict[str, Any]:
    if len(argv) > 1 and argv[1] != "-":
        text = argv[1]
        if not text.lstrip().startswith("{") and os.path.exists(text):
            with open(text) as fh:
                text = fh.read()
    else:
        text = sys.stdin.read()
    spec = json.loads(text)
    if not isinstance(spec, dict) or "config" not in spec:
        raise SystemExit("worker: the spec must be a JSON object with a 'config' key")
    return spec


def main(argv: list[str]) -> int:
    spec = _read_spec(argv)
    threads = int(spec.get("threads") or os.cpu_count() or 1)
    batch_size = int(spec.get("batch_size", 4))
    seq_len = int(spec.get("seq_len", 2048))
    warmup = int(spec.get("warmup", 2))
    steps = int(spec.get("steps", 5))
    seed = int(spec.get("seed", 0))
    mode = str(spec.get("mode", "train"))
    if mode not in ("train", "profile"):
        raise SystemExit(f"worker: unknown mode {mode!r} (train, profile)")
    if steps < 1:
        raise SystemExit("worker: steps must be >= 1")

    t_import = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    import mblm
    from mblm import MBLM, MBLMModelConfig, MBLMReturnType

    import_s = time.perf_counter() - t_import
    baseline_rss = _current_rss_bytes()

    torch.manual_seed(seed)
    t_build = time.perf_counter()
    cfg = MBLMModelConfig.model_validate(spec["config"])
    model = MBLM(cfg)
    model.train()
    if spec.get("compile"):
        model.compile()
    build_s = time.perf_counter() - t_build
    num_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))

    gen = torch.Generator().manual_seed(seed + 1)

    def batch() -> torch.Tensor:
        return torch.randint(0, 256, (batch_size, seq_len), dtype=torch.long, generator=gen)

    def step(x: torch.Tensor) -> float:
        loss = model(x, return_type=MBLMReturnType.LOSS)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    losses: list[float] = []
    for _ in range(warmup):
        losses.append(step(batch()))

    step_times: list[float] = []
    profile_table: str | None = None

    cpu_wall = [0.0, 0.0]

    def timed_steps() -> None:
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            x = batch()
            t0 = time.perf_counter()
            losses.append(step(x))
            step_times.append(time.perf_counter() - t0)
        cpu_wall[:] = [time.process_time() - c0, time.perf_counter() - w0]

    if mode == "profile":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            timed_steps()
        rows = int(spec.get("profile_rows", 30))
        sort_by = str(spec.get("profile_sort", "self_cpu_time_total"))
        profile_table = prof.key_averages().table(sort_by=sort_by, row_limit=rows)
        profile_table += "\n\n# grouped by input shape (top by self CPU time)\n"
        profile_table += prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=rows
        )
    else:
        timed_steps()

    med = statistics.median(step_times)
    bytes_per_step = batch_size * seq_len
    out: dict[str, Any] = {
        "side": spec.get("side"),
        "mode": mode,
        "mblm_file": getattr(mblm, "__file__", None),
        "mblm_version": getattr(mblm, "__version__", None),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "num_params": num_params,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "bytes_per_step": bytes_per_step,
        "warmup": warmup,
        "steps": steps,
        "step_times_s": step_times,
        "median_step_s": med,
        "bytes_per_s": bytes_per_step / med,
        # CPU seconds this process used per wall second of the timed steps, divided by the
        # thread count: well below 1 means the threads waited for cores (a busy machine)
        "cpu_utilization": cpu_wall[0] / (cpu_wall[1] * threads) if cpu_wall[1] else None,
        "import_s": import_s,
        "build_s": build_s,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "baseline_rss_bytes": baseline_rss,
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    if profile_table is not None:
        out["profile"] = profile_table
    sys.stdout.write("\n" + json.dumps(out) + "\n")  # the last stdout line
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
