"""Where a workload's time goes in the engine, from `e2e.py --step-logs DIR`: for each mode and each run of a
workload, its wall time against the engine's steps in it (how many, their host time, the engine idle between
them), the tokens they prefilled and decoded, and for chats when the requests got their first and last tokens.
Idle is the engine's host outside its steps (taking commands, or waiting for them); with overlapped steps the
device may still be computing the step launched last.

    python benchmarks/step_timeline.py DIR            # every mode and workload in DIR
    python benchmarks/step_timeline.py DIR --workloads gpts --steps    # and each step: start (s), ms, tokens...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def run_figures(steps: list[dict[str, Any]], span: list[float], chats: list[list[float]]) -> dict[str, Any]:
    """One run's figures from the steps that started within its span (times in seconds from the span's start)."""
    start, end = span
    inside = steps_in(steps, span)
    busy = sum(s["ms"] for s in inside) / 1e3
    figures: dict[str, Any] = {
        "wall_s": end - start,
        "steps": sum(s["launched"] for s in inside),  # a call that only read the step before back launched none
        "steps_s": busy,  # the engine's host time in steps (waiting for the device included)
        "idle_s": end - start - busy,
        "first_step_s": inside[0]["t"] - start if inside else None,
        "last_step_end_s": inside[-1]["t"] + inside[-1]["ms"] / 1e3 - start if inside else None,
        "prefill_tokens": sum(s["prefill_tokens"] for s in inside),
        "decode_tokens": sum(s["decode_tokens"] for s in inside),
        "prefill_steps": sum(1 for s in inside if s["prefill_tokens"]),
        "max_running": max((s["running"] for s in inside), default=0),
    }
    if inside:
        gaps = [b["t"] - (a["t"] + a["ms"] / 1e3) for a, b in zip(inside, inside[1:])]
        figures["largest_gaps_s"] = sorted(gaps, reverse=True)[:3]
        figures["median_step_ms"] = statistics.median(s["ms"] for s in inside)
    if chats:
        sent, first, done = zip(*chats)
        figures["chats"] = {
            "last_sent_s": max(sent) - start,
            "first_token_s": [min(first) - start, statistics.median(first) - start, max(first) - start],
            "done_s": [min(done) - start, statistics.median(done) - start, max(done) - start],
        }
    return figures


def steps_in(steps: list[dict[str, Any]], span: list[float]) -> list[dict[str, Any]]:
    """The steps that started within a run's span."""
    return [s for s in steps if span[0] <= s["t"] <= span[1]]


def read_steps(folder: Path, mode: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / f"{mode}.jsonl").read_text().splitlines() if line]


def read_spans(folder: Path, mode: str) -> dict[str, list[list[float]]]:
    """Each workload's runs' [start, end] (a folder written before `--repeats` holds one pair a workload)."""
    spans = json.loads((folder / f"{mode}.spans.json").read_text())
    return {name: runs if isinstance(runs[0], list) else [runs] for name, runs in spans.items()}


def step_rows(steps: list[dict[str, Any]], span: list[float]) -> list[str]:
    """Each step of a run: its start (s from the run's), the engine's idle time before it (ms), then its figures."""
    rows, last_end = [], span[0]
    for step in steps_in(steps, span):
        figures = " ".join(f"{k}={v}" for k, v in step.items() if k not in ("t", "ms"))
        idle_ms = 1e3 * (step["t"] - last_end)
        rows.append(f"{step['t'] - span[0]:8.3f} idle {idle_ms:7.1f} ms {step['ms']:8.1f} {figures}")
        last_end = step["t"] + step["ms"] / 1e3
    return rows


def timeline(folder: Path, mode: str, workloads: list[str] | None) -> dict[str, list[dict[str, Any]]]:
    steps = read_steps(folder, mode)
    spans = read_spans(folder, mode)
    chats_path = folder / f"{mode}.chats.json"
    chats = json.loads(chats_path.read_text()) if chats_path.exists() else {}
    return {name: [run_figures(steps, span, (chats.get(name) or [[]] * len(runs))[i]) for i, span in enumerate(runs)]
            for name, runs in spans.items() if workloads is None or name in workloads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--workloads", nargs="+")
    parser.add_argument("--steps", action="store_true", help="also print every step of every run")
    args = parser.parse_args()
    for log in sorted(p for p in args.folder.glob("*.jsonl") if p.with_suffix(".spans.json").exists()):
        steps, spans = read_steps(args.folder, log.stem), read_spans(args.folder, log.stem)
        for name, runs in timeline(args.folder, log.stem, args.workloads).items():
            for i, figures in enumerate(runs):
                print(f"{log.stem} {name} run {i}: {json.dumps(figures)}")
                if args.steps:
                    print("\n".join(step_rows(steps, spans[name][i])))


if __name__ == "__main__":
    main()
