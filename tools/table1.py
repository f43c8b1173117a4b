"""The paper's Table 1 beside ours: CRL score at depth 4 and 64 per environment, from run folders.

    python -m tools.table1 runs/table1__*            # run folders, or folders holding them
    python -m tools.table1 runs/ --out figures/table1.md

One row per (env, depth): our score = the mean of the last 5 evaluations of `eval/episode_success`
(steps near the goal, out of 1000) per seed, then mean +- std over seeds (population std, as
tools/curves.py); the paper's number (its Table 1, first arXiv version) beside it; on the depth-64
row the depth-64 / depth-4 ratio, ours and the paper's; the env steps the shortest seed reached; and
notes where a cell is not comparable to the paper's yet: fewer env steps than the paper's 100M
budget, unfinished runs, fewer than 3 seeds, several batch sizes mixed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too

import argparse
import math
from collections import defaultdict
from dataclasses import dataclass

from tools import runs as run_files

METRIC = "eval/episode_success"
# The paper's Table 1 (arXiv 2503.14858v1): score at depth 4 and depth 64.
PAPER = {
    "arm_binpick_hard": {4: 38, 64: 219},
    "arm_push_easy": {4: 308, 64: 762},
    "arm_push_hard": {4: 171, 64: 410},
    "ant_u4_maze": {4: 11.4, 64: 286},
    "ant_u5_maze": {4: 0.97, 64: 61},
    "ant_big_maze": {4: 61, 64: 441},
    "ant_hardest_maze": {4: 215, 64: 387},
    "humanoid": {4: 12.6, 64: 649},
    "humanoid_u_maze": {4: 3.2, 64: 159},
    "humanoid_big_maze": {4: 0.06, 64: 59},
}
PAPER_ENV_STEPS = 100_000_000  # the paper's budget for most tasks (some ran longer)
# crl_deep with the paper's settings stops at 98,946,048 env steps (whole training steps of
# 512 envs x 62 steps per epoch): runs that reach 98% of the budget count as full length.
FULL_LENGTH = 0.98
PAPER_SEEDS = 3


@dataclass
class SeedScore:
    """One seed of one run folder (a folder holds one seed, or several with a `seed` field per line)."""

    path: str
    env: str
    depth: int
    batch_size: int | None
    seed: int | None
    score: float
    env_steps: int
    finished: bool


def seed_scores(run: run_files.RunData) -> list[SeedScore]:
    """The seeds of a run folder: one, or several trained in one process (split by run_files.split_seeds),
    each scored by its own last 5 evaluations."""
    out = []
    for seed_run in run_files.split_seeds(run):
        args = seed_run.args
        steps = max((r.get("env_steps", 0) for r in seed_run.epochs), default=0)
        score = seed_run.score(METRIC)
        out.append(
            SeedScore(
                run.path,
                args.get("env"),
                args.get("depth"),
                args.get("batch_size"),
                args.get("seed"),
                score,
                steps,
                seed_run.finished,
            )
        )
    return out


def table_rows(runs: list[run_files.RunData]) -> list[dict]:
    """One dict per (env, depth), sorted by the paper's env order then depth."""
    cells = defaultdict(list)
    for run in runs:
        for s in seed_scores(run):
            cells[(s.env, s.depth)].append(s)
    order = list(PAPER)
    keys = sorted(cells, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), str(k[0]), k[1]))
    rows = []
    for env, depth in keys:
        members = cells[(env, depth)]
        scores = [s.score for s in members if not math.isnan(s.score)]
        mean = sum(scores) / len(scores) if scores else math.nan
        std = math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores)) if scores else math.nan
        steps = min(s.env_steps for s in members)
        notes = []
        if steps < FULL_LENGTH * PAPER_ENV_STEPS:
            notes.append(f"SHORT: {steps / PAPER_ENV_STEPS:.1%} of the paper's 100M steps")
        unfinished = sum(not s.finished for s in members)
        if unfinished:
            notes.append(f"{unfinished} unfinished")
        if len(scores) < PAPER_SEEDS:
            notes.append(f"{len(scores)} seed{'s' * (len(scores) != 1)}")
        batches = sorted({s.batch_size for s in members if s.batch_size is not None})
        if len(batches) > 1:
            notes.append(f"batch sizes mixed: {batches}")
        rows.append(
            {
                "env": env,
                "depth": depth,
                "mean": mean,
                "std": std,
                "seeds": len(scores),
                "batch_size": batches[0] if len(batches) == 1 else None,
                "paper": PAPER.get(env, {}).get(depth),
                "env_steps": steps,
                "notes": notes,
            }
        )
    by_cell = {(r["env"], r["depth"]): r for r in rows}
    for r in rows:
        r["ratio"] = r["paper_ratio"] = None
        if r["depth"] == 64 and (r["env"], 4) in by_cell:
            r["ratio"] = _ratio(r["mean"], by_cell[(r["env"], 4)]["mean"])
        if r["depth"] == 64 and r["env"] in PAPER:
            r["paper_ratio"] = _ratio(PAPER[r["env"]][64], PAPER[r["env"]][4])
    return rows


def _ratio(deep: float, shallow: float) -> float | None:
    if math.isnan(deep) or math.isnan(shallow):
        return None
    if shallow == 0:
        return math.inf if deep > 0 else None
    return deep / shallow


def _number(x) -> str:
    """Ours: 0 decimals from 100, 1 from 1, 2 significant digits below."""
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.2g}"


def _ratio_text(x) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2g}x" if x < 10 else f"{x:.0f}x"


def markdown(rows: list[dict]) -> str:
    lines = [
        f"Score = `{METRIC}` (steps near the goal, out of 1000), mean of the last 5 evaluations per "
        "seed, then mean +- std over seeds. Paper = its Table 1. Ratio = depth 64 / depth 4.",
        "",
        "| env | depth | ours | seeds | paper | ratio (ours) | ratio (paper) | env steps | batch | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = f"{_number(r['mean'])} +- {_number(r['std'])}" if r["seeds"] else "-"
        paper = "-" if r["paper"] is None else f"{r['paper']:g}"  # as published
        lines.append(
            f"| {r['env']} | {r['depth']} | {ours} | {r['seeds']} | {paper} | "
            f"{_ratio_text(r['ratio'])} | {_ratio_text(r['paper_ratio'])} | {r['env_steps']:,} | "
            f"{r['batch_size'] if r['batch_size'] is not None else '-'} | {'; '.join(r['notes'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="crl_deep run folders, or folders holding them")
    parser.add_argument("--out", default=None, help="also write the table to this .md file")
    args = parser.parse_args(argv)
    try:
        found = run_files.find_runs(args.paths)
        usable = [r for r in found if r.script == "crl_deep" and "env" in r.args and "depth" in r.args]
        if len(usable) < len(found):
            print(f"note: {len(found) - len(usable)} run folder(s) not made by crl_deep.py left out", file=sys.stderr)
        if not usable:
            raise ValueError(f"no crl_deep run folders (config.json + metrics.jsonl) under {args.paths}")
        text = markdown(table_rows(usable))
        if args.out:
            run_files.atomic_write(args.out, text)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
