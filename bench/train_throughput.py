"""Training throughput of our ``mblm`` against the reference (PyPI ``mblm`` 0.4.2).

Both packages are imported as ``mblm``, so they never share a process: every measurement is
a fresh ``bench/worker.py`` subprocess, run by our interpreter (``--ours-python``, default:
the one running this script) or by the reference venv's interpreter (``MBLM_REF_PYTHON``,
else ``.venv-ref/bin/python`` under the repo root).

The machine is assumed to be shared and noisy, so both sides are measured in one run,
interleaved: each round runs ours then the reference (or the reverse; the order alternates
every round), each for a few warmup steps and a few timed steps. The table reports the
median over all timed steps of each side, bytes/s = batch * seq_len / median step time, and
the ratio ours / reference (> 1: ours is faster). The per-round ratios (paired
measurements, taken seconds apart) are reported as a min-max range next to it.

Usage::

    .venv/bin/python bench/train_throughput.py                   # transformer, mamba_transformer
    .venv/bin/python bench/train_throughput.py --case transformer --rounds 7
    .venv/bin/python bench/train_throughput.py --case three_stage_1m   # heavy: ~15 GB RAM
    .venv/bin/python bench/train_throughput.py --quick           # tiny sizes, smoke test

Results go to ``bench/results/train_throughput.md`` (and ``.json`` with every raw number);
a run of other cases than the default set, or ``--quick``, writes a file named after them.
The exit status is 1 if a worker failed or the Transformer case has unequal parameter
counts (the two models must be the same architecture there), else 0: missing a speed
target is reported in the table, not in the exit status.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORKER = BENCH_DIR / "worker.py"
RESULTS_DIR = BENCH_DIR / "results"

SIDES = ("ours", "ref")

TRANSFORMER = {
    "block_type": "transformer",
    "attn_head_dims": 64,
    "attn_num_heads": 4,
    "attn_use_rot_embs": True,
    "pos_emb_type": "fixed",
}


def mamba_block(side: str, d_state: int = 128, headdim: int = 64) -> dict[str, Any]:
    """Ours is Mamba-2 (pure PyTorch on CPU); the reference without ``mamba_ssm`` falls
    back to mambapy's Mamba-1, which is the baseline being compared against."""
    return {
        "block_type": "mamba2" if side == "ours" else "mamba1",
        "d_state": d_state,
        "d_conv": 4,
        "expand": 2,
        "headdim": headdim,
        "pos_emb_type": None,
    }


@dataclass
class Case:
    name: str
    description: str
    configs: dict[str, dict[str, Any]]  # side -> MBLMModelConfig dict
    batch_size: int
    seq_len: int
    rounds: int
    warmup: dict[str, int]
    steps: dict[str, int]
    same_params: bool  # the two sides must build identical architectures
    target_ratio: float | None  # ours bytes/s over the reference's
    # steps whose count --steps/--warmup must not raise (the reference's slow fallback)
    pinned: set[str] = field(default_factory=set)
    # ours runs `model.compile()` (torch.compile of the forward; the first warmup step compiles)
    compile_ours: bool = False


def _model(
    hidden: list[int],
    seq_lens: list[int],
    layers: list[int],
    blocks: list[dict[str, Any]],
    chunks: list[int] | None = None,
) -> dict[str, Any]:
    return {
        "num_tokens": 257,
        "pad_token_id": 256,
        "hidden_dims": hidden,
        "seq_lens": seq_lens,
        "num_layers": layers,
        "train_checkpoint_chunks": chunks,
        "block": blocks,
    }


def build_cases(quick: bool) -> dict[str, Case]:
    if quick:  # tiny shapes: the whole smoke run takes seconds
        h2, s2, l2 = [32, 16], [32, 8], [1, 1]
        h3, s3, l3, c3 = [32, 16, 8], [16, 4, 4], [1, 1, 1], [2, 2]
        bs, sl, sl3, rounds = 2, 256, 256, 1
        w, n = 1, 2
        mamba_kw: dict[str, int] = {"d_state": 16, "headdim": 16}
    else:
        h2, s2, l2 = [256, 128], [256, 8], [4, 2]
        h3, s3, l3, c3 = [256, 128, 64], [8192, 16, 8], [2, 2, 2], [10, 20]
        bs, sl, sl3, rounds = 4, 2048, 1_048_576, 5
        w, n = 2, 4
        mamba_kw = {}
    return {
        "transformer": Case(
            name="transformer",
            description=(
                f"2-stage, hidden {h2}, seq_lens {s2}, layers {l2}, Transformer at both "
                f"stages; batch {bs} x {sl} bytes"
            ),
            configs={s: _model(h2, s2, l2, [TRANSFORMER, TRANSFORMER]) for s in SIDES},
            batch_size=bs,
            seq_len=sl,
            rounds=rounds,
            warmup={"ours": w, "ref": w},
            steps={"ours": n, "ref": n},
            same_params=True,
            target_ratio=1.25,
        ),
        "transformer_compiled": Case(
            name="transformer_compiled",
            description=(
                "the transformer case with ours compiled (`model.compile()`, torch.compile, "
                "2 warmup steps compile it); the reference eager"
            ),
            configs={s: _model(h2, s2, l2, [TRANSFORMER, TRANSFORMER]) for s in SIDES},
            batch_size=bs,
            seq_len=sl,
            rounds=3 if not quick else rounds,
            warmup={"ours": 2, "ref": w},
            steps={"ours": n, "ref": n},
            same_params=True,
            target_ratio=1.25,
            compile_ours=True,
        ),
        "mamba_transformer": Case(
            name="mamba_transformer",
            description=(
                f"2-stage, hidden {h2}, seq_lens {s2}, layers {l2}, Mamba global "
                "(ours: Mamba-2 SSD in PyTorch; reference: its CPU fallback, mambapy "
                f"Mamba-1) + Transformer local; batch {bs} x {sl} bytes"
            ),
            configs={
                s: _model(h2, s2, l2, [mamba_block(s, **mamba_kw), TRANSFORMER]) for s in SIDES
            },
            batch_size=bs,
            seq_len=sl,
            rounds=3 if not quick else rounds,
            warmup={"ours": w, "ref": 1},
            steps={"ours": n, "ref": n if quick else 2},
            same_params=False,
            target_ratio=10.0,
            pinned={"ref"},
        ),
        "three_stage_1m": Case(
            name="three_stage_1m",
            description=(
                f"3-stage, hidden {h3}, seq_lens {s3}, layers {l3}, "
                f"train_checkpoint_chunks {c3}, Transformer at all stages; "
                f"batch 1 x {sl3:,} bytes"
            ),
            configs={
                s: _model(h3, s3, l3, [TRANSFORMER, TRANSFORMER, TRANSFORMER], c3) for s in SIDES
            },
            batch_size=1,
            seq_len=sl3,
            rounds=1,
            warmup={"ours": 1, "ref": 1},
            steps={"ours": 1 if not quick else n, "ref": 1 if not quick else n},
            same_params=True,
            target_ratio=None,
            pinned={"ours", "ref"},
        ),
    }


DEFAULT_CASES = ["transformer", "transformer_compiled", "mamba_transformer"]


def ref_python() -> str:
    env = os.environ.get("MBLM_REF_PYTHON")
    if env:
        return env
    local = REPO_ROOT / ".venv-ref" / "bin" / "python"
    if not local.exists():
        raise SystemExit(f"reference venv missing ({local}): run `make install-ref`")
    return str(local)


def loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def wait_for_idle(max_wait_s: float, threshold: float) -> None:
    deadline = time.monotonic() + max_wait_s
    while True:
        la = loadavg()
        if la is None or la[0] <= threshold or time.monotonic() >= deadline:
            return
        print(f"[bench] load average {la[0]:.2f} > {threshold}; waiting ...", file=sys.stderr)
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))


def run_worker(
    python: str, spec: dict[str, Any], timeout_s: float, worker: Path = WORKER
) -> dict[str, Any]:
    """One worker subprocess (``worker``, a script taking its JSON spec on stdin); returns
    its JSON result, or ``{"error": ...}``."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # never let one side's package leak into the other
    env.pop("PYTHONHOME", None)
    threads = str(spec["threads"])
    env["OMP_NUM_THREADS"] = threads
    env["MKL_NUM_THREADS"] = threads
    # cwd outside the repo: `python -c`/`-m` style path entries must not pick up ./mblm
    with tempfile.TemporaryDirectory(prefix="mblm-bench-") as cwd:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [python, str(worker), "-"],
                input=json.dumps(spec),
                capture_output=True,
                text=True,
                cwd=cwd,
                env=env,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s", "wall_s": timeout_s}
        except OSError as err:
            return {"error": f"could not start {python}: {err}"}
        wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"error": f"exit {proc.returncode}: {tail}", "wall_s": wall}
    result: dict[str, Any] = json.loads(lines[-1])
    result["wall_s"] = wall
    return result


def run_meta(
    args: argparse.Namespace,
    la_start: tuple[float, float, float] | None,
    first: Any,
    pythons: dict[str, str],
) -> dict[str, Any]:
    """What a results file says about the run: command, machine, versions, load."""
    la_end = loadavg()
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node() or "?",
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch_ours": first("ours", "torch_version"),
        "torch_ref": first("ref", "torch_version"),
        "mblm_ours": first("ours", "mblm_version"),
        "mblm_ref": first("ref", "mblm_version"),
        "load_start": f"{la_start[0]:.2f}" if la_start else "?",
        "load_end": f"{la_end[0]:.2f}" if la_end else "?",
        "pythons": pythons,
        "quick": args.quick,
    }


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_case(case: Case, args: argparse.Namespace, pythons: dict[str, str]) -> dict[str, Any]:
    rounds = args.rounds if args.rounds is not None else case.rounds
    warmup = dict(case.warmup)
    steps = dict(case.steps)
    for side in SIDES:
        if side in case.pinned:
            continue
        if args.steps is not None:
            steps[side] = args.steps
        if args.warmup is not None:
            warmup[side] = args.warmup
    if args.ref_steps is not None:
        steps["ref"] = args.ref_steps

    la_before = loadavg()
    load = f"; load {la_before[0]:.2f}" if la_before else ""
    print(
        f"[bench] case {case.name}: {rounds} round(s); warmup/steps ours "
        f"{warmup['ours']}/{steps['ours']}, ref {warmup['ref']}/{steps['ref']}{load}",
        file=sys.stderr,
    )
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    t_case = time.perf_counter()
    for r in range(rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for side in order:
            spec = worker_spec(case, side, args, "train", warmup[side], steps[side])
            res = run_worker(pythons[side], spec, args.worker_timeout)
            res["round"] = r
            res["loadavg_after"] = loadavg()
            runs[side].append(res)
            if "error" in res:
                print(f"[bench]   round {r} {side}: ERROR {res['error']}", file=sys.stderr)
            else:
                times = ", ".join(f"{t:.3f}" for t in res["step_times_s"])
                print(
                    f"[bench]   round {r} {side}: steps [{times}] s, "
                    f"{res['bytes_per_s']:,.0f} B/s, peak RSS "
                    f"{res['peak_rss_bytes'] / 2**20:,.0f} MiB, "
                    f"CPU utilization {res['cpu_utilization']:.2f}",
                    file=sys.stderr,
                )
    summary = summarize(case, runs)
    summary["rounds"] = rounds
    summary["warmup"] = warmup
    summary["steps"] = steps
    summary["loadavg_before"] = la_before
    summary["loadavg_after"] = loadavg()
    summary["case_wall_s"] = time.perf_counter() - t_case
    summary["runs"] = runs
    return summary


def worker_spec(
    case: Case, side: str, args: argparse.Namespace, mode: str, warmup: int, steps: int
) -> dict[str, Any]:
    """What one worker run measures (see worker.py)."""
    return {
        "side": side,
        "config": copy.deepcopy(case.configs[side]),
        "batch_size": case.batch_size,
        "seq_len": case.seq_len,
        "warmup": warmup,
        "steps": steps,
        "threads": args.threads,
        "seed": args.seed,
        "mode": mode,
        "compile": case.compile_ours and side == "ours",
    }


def profile_case(case: Case, args: argparse.Namespace, pythons: dict[str, str]) -> None:
    """Run each selected side once under torch.profiler; write the op tables to results/."""
    sides = ["ours", "ref"] if args.profile_ref else ["ours"]
    for side in sides:
        spec = worker_spec(
            case, side, args, "profile", case.warmup[side], args.steps or case.steps[side]
        )
        spec["profile_rows"] = args.profile_rows
        res = run_worker(pythons[side], spec, args.worker_timeout)
        if "error" in res:
            print(f"[bench] profile {case.name} {side}: ERROR {res['error']}", file=sys.stderr)
            continue
        suffix = "_quick" if args.quick else ""
        path = RESULTS_DIR / f"profile_{case.name}_{side}{suffix}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        times = ", ".join(f"{t:.3f}" for t in res["step_times_s"])
        header = (
            f"# {case.name} ({side}, mblm {res['mblm_version']}, torch {res['torch_version']}, "
            f"{res['threads']} threads): {res['steps']} profiled steps [{times}] s "
            f"(profiler overhead included)\n# {case.description}\n\n"
        )
        path.write_text(header + res["profile"] + "\n")
        print(f"[bench] wrote {path}", file=sys.stderr)


def summarize(case: Case, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"case": case.name, "description": case.description}
    errors = [f"{s}: {r['error']}" for s in SIDES for r in runs[s] if "error" in r]
    out["errors"] = errors
    bytes_per_step = case.batch_size * case.seq_len
    for side in SIDES:
        ok = [r for r in runs[side] if "error" not in r]
        all_times = [t for r in ok for t in r["step_times_s"]]
        med = median(all_times)
        params = {r["num_params"] for r in ok}
        out[side] = {
            "median_step_s": med,
            "bytes_per_s": bytes_per_step / med if med else None,
            "step_times_s": all_times,
            "round_medians_s": [r["median_step_s"] for r in ok],
            "num_params": params.pop() if len(params) == 1 else sorted(params) or None,
            "peak_rss_bytes": max((r["peak_rss_bytes"] for r in ok), default=None),
            "baseline_rss_bytes": max((r["baseline_rss_bytes"] or 0 for r in ok), default=None),
            "torch_version": ok[0]["torch_version"] if ok else None,
            "mblm_version": ok[0]["mblm_version"] if ok else None,
            "mblm_file": ok[0]["mblm_file"] if ok else None,
            "threads": ok[0]["threads"] if ok else None,
            "cpu_utilization": median([r["cpu_utilization"] for r in ok]),
        }
    o, f = out["ours"], out["ref"]
    out["ratio"] = (
        o["bytes_per_s"] / f["bytes_per_s"] if o["bytes_per_s"] and f["bytes_per_s"] else None
    )
    # paired per-round ratios (both sides measured within seconds of each other)
    pairs = [
        f_r["median_step_s"] / o_r["median_step_s"]
        for o_r in runs["ours"]
        for f_r in runs["ref"]
        if "error" not in o_r and "error" not in f_r and o_r["round"] == f_r["round"]
    ]
    out["round_ratios"] = pairs
    if o["mblm_file"] and f["mblm_file"] and o["mblm_file"] == f["mblm_file"]:
        errors.append(f"both sides imported the same mblm ({o['mblm_file']})")
    out["params_equal"] = o["num_params"] == f["num_params"]
    out["params_mismatch"] = case.same_params and not out["params_equal"] and not errors
    out["target_ratio"] = case.target_ratio
    out["target_met"] = (
        None
        if case.target_ratio is None or out["ratio"] is None
        else out["ratio"] >= case.target_ratio
    )
    return out


def _fmt_int(x: Any) -> str:
    if isinstance(x, int):
        return f"{x:,}"
    return "-" if x is None else str(x)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def meta_lines(meta: dict[str, Any]) -> list[str]:
    """The lines of a results file that say how and where it was measured."""
    return [
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- host: {meta['host']}, {meta['cpu_count']} CPUs, worker threads {meta['threads']}",
        f"- torch: ours {meta['torch_ours']}, reference {meta['torch_ref']}; "
        f"python {meta['python']}",
        f"- mblm: ours {meta['mblm_ours']}, reference {meta['mblm_ref']}",
        f"- load average (1 min) at start / end: {meta['load_start']} / {meta['load_end']}",
    ]


def _mib(x: int | None) -> str:
    return "-" if not x else f"{x / 2**20:,.0f}"


def render_markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        "# Training throughput: ours vs reference (PyPI mblm 0.4.2)",
        "",
        *meta_lines(meta),
        "- all CPU fp32; step = forward (LOSS) + backward + AdamW step + zero_grad; "
        "bytes/s = batch x seq_len / median step time over all timed steps of all rounds",
        "",
        "| case | params ours | params ref | ours bytes/s | ref bytes/s | ratio (ours/ref) "
        "| per-round ratios | target | ours step s | ref step s | peak RSS MiB ours / ref "
        "| CPU util ours / ref | rounds x steps (ours; ref) |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        o, f = r["ours"], r["ref"]
        params_note = "" if r["params_equal"] or not r["params_mismatch"] else " **MISMATCH**"
        if r["target_ratio"] is None:
            target = "-"
        else:
            verdict = {True: "met", False: "**missed**", None: "?"}[r["target_met"]]
            target = f">= {r['target_ratio']:g}x: {verdict}"
        rr = r["round_ratios"]
        rr_s = f"{min(rr):.2f}-{max(rr):.2f}" if rr else "-"
        lines.append(
            f"| {r['case']} | {_fmt_int(o['num_params'])}{params_note} "
            f"| {_fmt_int(f['num_params'])} "
            f"| {_fmt(o['bytes_per_s'], ',.0f')} | {_fmt(f['bytes_per_s'], ',.0f')} "
            f"| {_fmt(r['ratio'], '.2f')}x | {rr_s} | {target} "
            f"| {_fmt(o['median_step_s'], '.3f')} | {_fmt(f['median_step_s'], '.3f')} "
            f"| {_mib(o['peak_rss_bytes'])} / {_mib(f['peak_rss_bytes'])} "
            f"| {_fmt(o['cpu_utilization'], '.2f')} / {_fmt(f['cpu_utilization'], '.2f')} "
            f"| {r['rounds']} x {r['steps']['ours']}; {r['rounds']} x {r['steps']['ref']} |"
        )
    lines.append("")
    for r in results:
        lines.append(f"- **{r['case']}**: {r['description']}.")
        la_b, la_a = r["loadavg_before"], r["loadavg_after"]
        if la_b and la_a:
            lines.append(
                f"  Load average (1/5/15 min) before: {la_b[0]:.2f}/{la_b[1]:.2f}/{la_b[2]:.2f},"
                f" after: {la_a[0]:.2f}/{la_a[1]:.2f}/{la_a[2]:.2f}; "
                f"case wall time {r['case_wall_s']:.0f} s."
            )
        for side in SIDES:
            ts = ", ".join(f"{t:.2f}" for t in r[side]["step_times_s"])
            util = _fmt(r[side]["cpu_utilization"], ".2f")
            lines.append(f"  {side} step times (s): {ts or '-'}; CPU utilization {util}")
        for err in r["errors"]:
            lines.append(f"  ERROR {err}")
    lines.append("")
    return "\n".join(lines)


def default_out(cases: list[str], quick: bool) -> Path:
    stem = "train_throughput"
    if cases != DEFAULT_CASES:
        stem += "_" + "_".join(cases)
    if quick:
        stem += "_quick"
    return RESULTS_DIR / f"{stem}.md"


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options every side-by-side benchmark takes: threads, interpreters, output, load."""
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours-python", default=sys.executable, help="interpreter with our mblm")
    p.add_argument("--ref-python", default=None, help="default: $MBLM_REF_PYTHON, .venv-ref")
    p.add_argument("--out", type=Path, default=None, help="Markdown output path")
    p.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds per worker")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="wait up to this many seconds for the 1-min load average to drop below "
        "--idle-load before starting",
    )
    p.add_argument("--idle-load", type=float, default=1.5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--case",
        action="append",
        choices=["transformer", "transformer_compiled", "mamba_transformer", "three_stage_1m"],
        help=f"case to run (repeatable); default: {' '.join(DEFAULT_CASES)}",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: per case)")
    p.add_argument(
        "--steps",
        type=int,
        help="timed steps per worker (default: per case; does not raise the reference's "
        "pinned counts in mamba_transformer or the 1M case, see --ref-steps)",
    )
    p.add_argument("--warmup", type=int, help="untimed warmup steps per worker")
    p.add_argument("--ref-steps", type=int, help="timed steps of the reference side")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    add_common_args(p)
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing, run our side of each case once under torch.profiler and "
        "write the top ops to results/profile_<case>_ours.txt",
    )
    p.add_argument("--profile-ref", action="store_true", help="with --profile: also the reference")
    p.add_argument("--profile-rows", type=int, default=30)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases_sel = args.case or list(DEFAULT_CASES)
    cases_sel = list(dict.fromkeys(cases_sel))
    all_cases = build_cases(args.quick)
    pythons = {"ours": args.ours_python, "ref": args.ref_python or ref_python()}
    for side, py in pythons.items():
        if not Path(py).exists():
            print(f"[bench] {side} interpreter not found: {py}", file=sys.stderr)
            return 2
    print(f"[bench] ours: {pythons['ours']}  reference: {pythons['ref']}", file=sys.stderr)
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle, args.idle_load)
    la_start = loadavg()
    if la_start and la_start[0] > args.idle_load:
        print(
            f"[bench] warning: load average {la_start[0]:.2f} > {args.idle_load}: the "
            "machine is busy, absolute numbers will be low (the ratio is more robust)",
            file=sys.stderr,
        )

    if args.profile:
        for name in cases_sel:
            profile_case(all_cases[name], args, pythons)
        return 0

    results = [run_case(all_cases[name], args, pythons) for name in cases_sel]

    def first(side: str, key: str) -> Any:
        return next((r[side][key] for r in results if r[side][key]), None)

    meta = run_meta(args, la_start, first, pythons)
    md = render_markdown(meta, results)
    print(md)
    out = args.out or default_out(cases_sel, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n"
    )
    print(f"[bench] wrote {out} and {out.with_suffix('.json').name}", file=sys.stderr)

    failed = any(r["errors"] for r in results)
    mismatch = [r["case"] for r in results if r["params_mismatch"]]
    if mismatch:
        print(f"[bench] parameter counts differ in: {', '.join(mismatch)}", file=sys.stderr)
    return 1 if failed or mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
