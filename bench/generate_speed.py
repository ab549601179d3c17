"""Generation speed: our cached ``MBLM.generate`` against the reference's (PyPI ``mblm`` 0.4.2),
which reruns the whole model over the whole sequence for every byte.

As in ``train_throughput.py``, the two packages never share a process: each measurement is a
fresh ``bench/generate_worker.py`` subprocess run by our interpreter or the reference venv's
(``MBLM_REF_PYTHON``, else ``.venv-ref/bin/python``). A case has several arms (a side, a
model, a context length); each round runs every arm once, in an order that alternates
between rounds, so all arms see the same machine conditions. Random weights (seed 0), random
prompt bytes, greedy decoding (both packages' default), CPU, fp32.

An arm generates ``new_bytes`` bytes after a prompt of ``context - new_bytes`` bytes and
reports bytes/s = new_bytes / wall time of the ``generate`` call (prefill included), the
median over its timed calls, and the time to the first byte (a 1-byte ``generate``). The
reference is slow, so it generates fewer bytes per call (its time per byte does not depend
on how many it generates: every byte is a full forward pass over the whole context).

Cases (full size; ``--quick`` shrinks everything to a smoke run of under a minute):

- ``transformer_512`` / ``transformer_2048``: 2 stages, hidden [256, 128], seq_lens [256, 8],
  layers [4, 2], Transformer at both stages, at 512 / 2,048 bytes of context; the 2,048 case
  also runs ours with ``use_cache=False``. Target at 2,048: ours >= 10x the reference.
- ``mamba_2048``: the same shape with a Mamba global stage (ours: Mamba-2; the reference
  without mamba-ssm: its mambapy Mamba-1 fallback, the baseline) and also ours with the
  Mamba-1 block (the reference's architecture). Target: ours (Mamba-2) >= 50x.
- ``flat_4096``: ours only, the Transformer model widened to seq_lens [512, 8]: time per
  byte at 4,096 bytes of context over that at 512. Target: <= 1.5.

Usage::

    .venv/bin/python bench/generate_speed.py            # all cases, 5 rounds
    .venv/bin/python bench/generate_speed.py --quick    # tiny models, seconds
    .venv/bin/python bench/generate_speed.py --case transformer_2048 --rounds 5

Results: ``bench/results/generate_speed.md`` and ``.json`` (``generate_speed_quick`` for
``--quick``; ``--out`` to choose). Exit status 1 if a worker failed; a missed target is
reported in the table, not in the exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train_throughput import (
    TRANSFORMER,
    _model,
    add_common_args,
    loadavg,
    mamba_block,
    median,
    meta_lines,
    ref_python,
    run_meta,
    run_worker,
    wait_for_idle,
)

BENCH_DIR = Path(__file__).resolve().parent
GEN_WORKER = BENCH_DIR / "generate_worker.py"
RESULTS_DIR = BENCH_DIR / "results"


@dataclass
class Arm:
    label: str
    side: str  # "ours" or "ref": which interpreter
    config: dict[str, Any]
    context: int
    new_bytes: int
    repeats: int
    warmup_bytes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    model: str = ""  # short description for the table


@dataclass
class Compare:
    a: str
    b: str
    kind: str  # "speedup": bytes/s of a over b (>= target); "growth": s/byte of a over b (<=)
    target: float | None


@dataclass
class Case:
    name: str
    description: str
    arms: list[Arm]
    compares: list[Compare]


def build_cases(quick: bool) -> dict[str, Case]:
    if quick:
        hidden, lens, layers, wide = [32, 16], [32, 8], [1, 1], [64, 8]
        ctx_small, ctx, ctx_wide = 64, 256, 512
        ours_new, ref_new, ref_new_mamba, reps = 32, 8, 4, 1
        mamba_kw: dict[str, int] = {"d_state": 16, "headdim": 16}
    else:
        hidden, lens, layers, wide = [256, 128], [256, 8], [4, 2], [512, 8]
        ctx_small, ctx, ctx_wide = 512, 2048, 4096
        ours_new, ref_new, ref_new_mamba, reps = 256, 16, 4, 2
        mamba_kw = {}
    transformer = _model(hidden, lens, layers, [TRANSFORMER, TRANSFORMER])
    t_desc = f"Transformer, hidden {hidden}, seq_lens {lens}, layers {layers}"

    def ours(label: str, config: dict, context: int, model: str, **kw: Any) -> Arm:
        return Arm(label, "ours", config, context, ours_new, reps, 16, kw, model)

    def ref(label: str, config: dict, context: int, new: int, model: str) -> Arm:
        return Arm(label, "ref", config, context, new, 1, 1, {}, model)

    mamba = {
        s: _model(hidden, lens, layers, [mamba_block(s, **mamba_kw), TRANSFORMER])
        for s in ("ours", "ref")
    }
    mamba1 = _model(hidden, lens, layers, [mamba_block("ref", **mamba_kw), TRANSFORMER])
    m_desc = f"Mamba global + Transformer local, hidden {hidden}, seq_lens {lens}, layers {layers}"
    wide_cfg = _model(hidden, wide, layers, [TRANSFORMER, TRANSFORMER])
    cases = {
        f"transformer_{ctx_small}": Case(
            f"transformer_{ctx_small}",
            f"{t_desc}; {ctx_small} bytes of context",
            [
                ours("ours", transformer, ctx_small, "Transformer"),
                ref("ref", transformer, ctx_small, 2 * ref_new, "Transformer"),
            ],
            [Compare("ours", "ref", "speedup", None)],
        ),
        f"transformer_{ctx}": Case(
            f"transformer_{ctx}",
            f"{t_desc}; {ctx} bytes of context",
            [
                ours("ours", transformer, ctx, "Transformer"),
                Arm(
                    "ours_no_cache",
                    "ours",
                    transformer,
                    ctx,
                    ref_new,
                    1,
                    1,
                    {"use_cache": False},
                    "Transformer",
                ),
                ref("ref", transformer, ctx, ref_new, "Transformer"),
            ],
            [
                Compare("ours", "ref", "speedup", 10.0),
                Compare("ours_no_cache", "ref", "speedup", None),
            ],
        ),
        f"mamba_{ctx}": Case(
            f"mamba_{ctx}",
            f"{m_desc}; {ctx} bytes of context. ours: Mamba-2 (pure PyTorch) and Mamba-1 "
            "(mambapy, the reference's CPU architecture); ref: its mambapy Mamba-1 fallback",
            [
                ours("ours", mamba["ours"], ctx, "Mamba-2 + Transformer"),
                ours("ours_mamba1", mamba1, ctx, "Mamba-1 + Transformer"),
                ref("ref", mamba["ref"], ctx, ref_new_mamba, "Mamba-1 + Transformer"),
            ],
            [
                Compare("ours", "ref", "speedup", 50.0),
                Compare("ours_mamba1", "ref", "speedup", None),
            ],
        ),
        f"flat_{ctx_wide}": Case(
            f"flat_{ctx_wide}",
            f"ours only: Transformer, hidden {hidden}, seq_lens {wide}, layers {layers}; "
            f"time per byte at {ctx_wide} bytes of context over {ctx_small}",
            [
                ours(f"ours@{ctx_small}", wide_cfg, ctx_small, "Transformer"),
                ours(f"ours@{ctx_wide}", wide_cfg, ctx_wide, "Transformer"),
            ],
            [Compare(f"ours@{ctx_wide}", f"ours@{ctx_small}", "growth", 1.5)],
        ),
    }
    if quick:  # the targets are for the full-size models
        for case in cases.values():
            for c in case.compares:
                c.target = None
    return cases


def arm_spec(arm: Arm, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "side": arm.label,
        "config": arm.config,
        "context": arm.context,
        "new_bytes": arm.new_bytes,
        "repeats": arm.repeats,
        "warmup_bytes": arm.warmup_bytes,
        "first_byte": True,
        "threads": args.threads,
        "seed": args.seed,
        "kwargs": arm.kwargs,
    }


def run_case(case: Case, args: argparse.Namespace, pythons: dict[str, str]) -> dict[str, Any]:
    la_before = loadavg()
    print(f"[bench] case {case.name}: {args.rounds} round(s)", file=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {a.label: [] for a in case.arms}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for arm in case.arms if r % 2 == 0 else case.arms[::-1]:
            res = run_worker(
                pythons[arm.side], arm_spec(arm, args), args.worker_timeout, GEN_WORKER
            )
            res["round"] = r
            res["loadavg_after"] = loadavg()
            runs[arm.label].append(res)
            if "error" in res:
                print(f"[bench]   round {r} {arm.label}: ERROR {res['error']}", file=sys.stderr)
            else:
                print(
                    f"[bench]   round {r} {arm.label}: {res['bytes_per_s']:,.1f} B/s "
                    f"({res['s_per_byte'] * 1e3:.2f} ms/byte, first byte "
                    f"{res['first_byte_s'] * 1e3:.0f} ms), CPU utilization "
                    f"{res['cpu_utilization']:.2f}",
                    file=sys.stderr,
                )
    arms: dict[str, dict[str, Any]] = {}
    for arm in case.arms:
        ok = [r for r in runs[arm.label] if "error" not in r]
        per_byte = [t / arm.new_bytes for r in ok for t in r["call_times_s"]]
        med = median(per_byte)
        arms[arm.label] = {
            "side": arm.side,
            "model": arm.model,
            "context": arm.context,
            "new_bytes": arm.new_bytes,
            "kwargs": arm.kwargs,
            "s_per_byte": med,
            "bytes_per_s": 1 / med if med else None,
            "first_byte_s": median([r["first_byte_s"] for r in ok if r["first_byte_s"]]),
            "cpu_utilization": median([r["cpu_utilization"] for r in ok]),
            "num_params": ok[0]["num_params"] if ok else None,
            "mblm_version": ok[0]["mblm_version"] if ok else None,
            "torch_version": ok[0]["torch_version"] if ok else None,
            "mblm_file": ok[0]["mblm_file"] if ok else None,
            "round_s_per_byte": {r["round"]: r["s_per_byte"] for r in ok},
        }
    compares = []
    for c in case.compares:
        a, b = arms[c.a], arms[c.b]
        if c.kind == "speedup":
            value = (
                b["s_per_byte"] / a["s_per_byte"] if a["s_per_byte"] and b["s_per_byte"] else None
            )
        else:
            value = (
                a["s_per_byte"] / b["s_per_byte"] if a["s_per_byte"] and b["s_per_byte"] else None
            )
        rounds = sorted(set(a["round_s_per_byte"]) & set(b["round_s_per_byte"]))
        pairs = [
            (b["round_s_per_byte"][r] / a["round_s_per_byte"][r])
            if c.kind == "speedup"
            else (a["round_s_per_byte"][r] / b["round_s_per_byte"][r])
            for r in rounds
        ]
        met = None
        if value is not None and c.target is not None:
            met = value >= c.target if c.kind == "speedup" else value <= c.target
        compares.append(
            {
                "a": c.a,
                "b": c.b,
                "kind": c.kind,
                "value": value,
                "round_values": pairs,
                "target": c.target,
                "met": met,
            }
        )
    errors = [f"{label}: {r['error']}" for label, rs in runs.items() for r in rs if "error" in r]
    ref_files = {arms[a.label]["mblm_file"] for a in case.arms if a.side == "ref"} - {None}
    our_files = {arms[a.label]["mblm_file"] for a in case.arms if a.side == "ours"} - {None}
    if ref_files & our_files:
        errors.append(f"both sides imported the same mblm ({ref_files & our_files})")
    return {
        "case": case.name,
        "description": case.description,
        "arms": arms,
        "compares": compares,
        "errors": errors,
        "loadavg_before": la_before,
        "loadavg_after": loadavg(),
        "case_wall_s": time.perf_counter() - t0,
        "runs": runs,
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        "# Generation speed: ours (cached decoding) vs reference (PyPI mblm 0.4.2)",
        "",
        *meta_lines(meta),
        "- all CPU fp32, random weights, greedy decoding (both packages' default); a call "
        "generates N bytes after a random prompt of (context - N) bytes; bytes/s = N / wall "
        "time of the call (prefill included), median over all timed calls of all rounds; "
        "first byte = wall time of a 1-byte call (for ours: the prefill)",
        "",
        "| case | arm | model | context | bytes per call | ms/byte | bytes/s | first byte ms "
        "| CPU util | params |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for label, a in res["arms"].items():
            extra = " (no cache)" if a["kwargs"].get("use_cache") is False else ""
            lines.append(
                f"| {res['case']} | {label} | {a['model']}{extra} | {a['context']:,} | "
                f"{a['new_bytes']} | {_fmt(a['s_per_byte'] and a['s_per_byte'] * 1e3, '.2f')} | "
                f"{_fmt(a['bytes_per_s'], ',.1f')} | "
                f"{_fmt(a['first_byte_s'] and a['first_byte_s'] * 1e3, ',.0f')} | "
                f"{_fmt(a['cpu_utilization'], '.2f')} | {_fmt(a['num_params'], ',')} |"
            )
    lines += [
        "",
        "| case | comparison | value | per-round values | target |",
        "|---|---|---:|---|---|",
    ]
    for res in results:
        for c in res["compares"]:
            if c["kind"] == "speedup":
                what, want = f"bytes/s {c['a']} / {c['b']}", ">="
            else:
                what, want = f"time per byte {c['a']} / {c['b']}", "<="
            rv = c["round_values"]
            span = f"{min(rv):.2f}-{max(rv):.2f}" if rv else "-"
            target = "-"
            if c["target"] is not None:
                verdict = "met" if c["met"] else "**missed**"
                target = f"{want} {c['target']:g}: {verdict}"
            lines.append(
                f"| {res['case']} | {what} | {_fmt(c['value'], ',.2f')}x | {span} | {target} |"
            )
    lines.append("")
    for res in results:
        lb, la = res["loadavg_before"], res["loadavg_after"]
        load = (
            f"load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in lb)}, after: "
            f"{'/'.join(f'{x:.2f}' for x in la)}; "
            if lb and la
            else ""
        )
        lines.append(
            f"- **{res['case']}**: {res['description']}. {load}case wall time "
            f"{res['case_wall_s']:.0f} s."
        )
        for label, rs in res["runs"].items():
            ok = [r for r in rs if "error" not in r]
            per = ", ".join(f"{r['s_per_byte'] * 1e3:.2f}" for r in ok)
            lines.append(f"  {label} ms/byte per round: {per}")
        for e in res["errors"]:
            lines.append(f"  ERROR {e}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--case", action="append", help="case name (repeatable; default: all)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 5, --quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny models: a smoke run")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = build_cases(args.quick)
    selected = list(dict.fromkeys(args.case or list(cases)))
    unknown = [c for c in selected if c not in cases]
    if unknown:
        print(f"[bench] unknown case(s) {unknown}; known: {', '.join(cases)}", file=sys.stderr)
        return 2
    pythons = {"ours": args.ours_python}
    if any(a.side == "ref" for c in selected for a in cases[c].arms):
        pythons["ref"] = args.ref_python or ref_python()
    for side, py in pythons.items():
        if not Path(py).exists():
            print(f"[bench] {side} interpreter not found: {py}", file=sys.stderr)
            return 2
    print(f"[bench] interpreters: {pythons}", file=sys.stderr)
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle, args.idle_load)
    la_start = loadavg()
    if la_start and la_start[0] > args.idle_load:
        print(
            f"[bench] warning: load average {la_start[0]:.2f}: the machine is busy", file=sys.stderr
        )

    results = [run_case(cases[name], args, pythons) for name in selected]

    def first(side: str, key: str) -> Any:
        return next(
            (a[key] for r in results for a in r["arms"].values() if a["side"] == side and a[key]),
            None,
        )

    meta = run_meta(args, la_start, first, pythons)
    md = render_markdown(meta, results)
    print(md)
    name = "generate_speed" + ("_quick" if args.quick else "")
    if args.case and not args.quick and set(selected) != set(cases):
        name += "_" + "_".join(selected)
    out = args.out or RESULTS_DIR / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n"
    )
    print(f"[bench] wrote {out} and {out.with_suffix('.json').name}", file=sys.stderr)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
