"""Learning curves and the score table from run folders on disk (no wandb needed).

    python -m tools.curves runs/depth --group depth --out figures/depth_curves.png --table figures/depth_table

One panel per environment, one line per group (e.g. per depth): the mean over seeds of
`eval/episode_success` against env steps, with a band of +-1 standard deviation over seeds (no band
with a single seed). The table (`<table>.md` and `<table>.csv`) gives each (env, group)'s score: the
mean of the last 5 evaluations per run, then mean, std and count over seeds.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too

import argparse
import csv
import io
import math
from collections import defaultdict

import numpy as np

from tools.runs import RunData, arg_value, atomic_write, find_runs, save_figure


def group_runs(runs: list[RunData], group_by: list[str], facet_by: str) -> dict:
    """{facet value: {group tuple: [runs]}}, both levels sorted (numbers numerically)."""
    out = defaultdict(lambda: defaultdict(list))
    for r in runs:
        out[arg_value(r, facet_by)][tuple(arg_value(r, k) for k in group_by)].append(r)
    return {f: dict(sorted(g.items(), key=lambda kv: _sort_key(kv[0]))) for f, g in sorted(out.items())}


def _sort_key(values: tuple):
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in values)


def _label(group_by: list[str], values: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(group_by, values))


def mean_curve(runs: list[RunData], metric: str):
    """Mean and std over seeds at each evaluation index (seeds of one config share the schedule;
    where a run has fewer evaluations the remaining seeds carry the mean). Returns x, mean, std, n."""
    series = [r.series(metric) for r in runs]
    series = [s for s in series if s[0]]
    if not series:
        return (np.zeros(0),) * 4
    length = max(len(xs) for xs, _ in series)
    x, mean, std, n = (np.full(length, np.nan) for _ in range(4))
    for i in range(length):
        xs = [s[0][i] for s in series if len(s[0]) > i]
        ys = [s[1][i] for s in series if len(s[1]) > i]
        x[i], mean[i], std[i], n[i] = np.mean(xs), np.mean(ys), np.std(ys), len(ys)
    return x, mean, std, n


def plot_curves(runs, group_by, metric, out, facet_by="env", title=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    grouped = group_runs(runs, group_by, facet_by)
    n = len(grouped)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    all_groups = sorted({g for groups in grouped.values() for g in groups}, key=_sort_key)
    cmap = plt.get_cmap("viridis")
    colors = {g: cmap(0.9 * i / max(1, len(all_groups) - 1)) for i, g in enumerate(all_groups)}
    for ax, (facet, groups) in zip(axes.flat, grouped.items()):
        for g, members in groups.items():
            x, m, s, cnt = mean_curve(members, metric)
            if x.size == 0:
                continue
            seeds = len(members)
            ax.plot(
                x,
                m,
                color=colors[g],
                lw=2,
                marker="o" if x.size < 15 else None,
                ms=3,
                label=f"{_label(group_by, g)} ({seeds} seed{'s' * (seeds > 1)})",
            )
            if seeds > 1:
                ax.fill_between(x, m - s, m + s, color=colors[g], alpha=0.2, lw=0)
        lows = [np.nanmin(r.series(metric)[1]) for g in groups.values() for r in g if r.series(metric)[1]]
        if lows and min(lows) >= 0:  # counts and distances: no negative axis (a small margin keeps 0 visible)
            top = ax.get_ylim()[1]
            ax.set_ylim(bottom=-0.03 * top, top=top)
        ax.set_title(str(facet))
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 2M, not 2000000 or 1e7 offsets
        ax.set_xlabel("env steps")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title or f"{metric}: mean over seeds, band = +-1 std", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


def score_table(runs, group_by, metric, facet_by="env") -> list[dict]:
    """One row per (facet, group): score = mean over runs of each run's last-5 mean of `metric`."""
    rows = []
    for facet, groups in group_runs(runs, group_by, facet_by).items():
        for g, members in groups.items():
            scores = np.array([r.score(metric) for r in members], dtype=float)
            scores = scores[~np.isnan(scores)]
            row = {facet_by: facet, **dict(zip(group_by, g))}
            row.update(
                {
                    "score_mean": float(scores.mean()) if scores.size else math.nan,
                    "score_std": float(scores.std()) if scores.size else math.nan,
                    "seeds": int(scores.size),
                    "finished": sum(r.finished for r in members),
                    "env_steps": max((r.epochs[-1].get("env_steps", 0) for r in members if r.epochs), default=0),
                }
            )
            rows.append(row)
    return rows


def write_table(rows: list[dict], metric: str, stem: str) -> tuple[str, str]:
    """Writes `<stem>.csv` and `<stem>.md` atomically; returns their paths."""
    if not rows:
        raise ValueError("no rows to write")
    keys = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(stem + ".csv", buf.getvalue())
    score_keys = {"score_mean", "score_std"}
    head = [k for k in keys if k not in score_keys]
    lines = [
        f"Score = mean of the last 5 evaluations of `{metric}` per run; mean +- std over seeds.",
        "",
        "| " + " | ".join(head[:-3] + ["score", "seeds", "finished", "env steps"]) + " |",
        "|" + "---|" * (len(head) + 1),
    ]
    for r in rows:
        cells = [str(r[k]) for k in head[:-3]]
        cells.append(f"{r['score_mean']:.2f} +- {r['score_std']:.2f}")
        cells += [str(r["seeds"]), str(r["finished"]), f"{r['env_steps']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write(stem + ".md", "\n".join(lines) + "\n")
    return stem + ".csv", stem + ".md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders or folders holding run folders")
    parser.add_argument("--group", nargs="+", default=["depth"], help="Args field(s) that define a line")
    parser.add_argument("--facet", default="env", help="Args field that defines a panel")
    parser.add_argument("--metric", default="eval/episode_success")
    parser.add_argument("--out", default="figures/curves.png", help="PNG path of the curves")
    parser.add_argument("--table", default=None, help="path stem of the table (.md and .csv); default: next to --out")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.paths)
        if not runs:
            raise ValueError(f"no run folders (with metrics.jsonl) under {args.paths}")
        keys = [k.replace("-", "_") for k in args.group + [args.facet]]
        usable = [r for r in runs if all(k == "script" or k in r.args for k in keys)]
        if len(usable) < len(runs):
            print(f"note: {len(runs) - len(usable)} run(s) without {keys} in their args left out", file=sys.stderr)
        if not usable:
            raise ValueError(f"no run has all of {keys} in its config.json args")
        runs = usable
        if not any(r.series(args.metric)[0] for r in runs):
            raise ValueError(f"no run logged {args.metric!r}")
        plot_curves(runs, args.group, args.metric, args.out, args.facet, args.title)
        stem = args.table or os.path.splitext(args.out)[0] + "_table"
        csv_path, md_path = write_table(score_table(runs, args.group, args.metric, args.facet), args.metric, stem)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(runs)} runs -> {args.out}, {md_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
