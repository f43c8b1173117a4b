"""Reading run folders (`runs/<run>/config.json`, `metrics.jsonl`, `summary.json`) and writing files
atomically; shared by the figure tools. Needs nothing but the files on disk (no wandb)."""

from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field

SCORE_WINDOW = 5  # the paper's single number: mean of the last 5 evaluations


@dataclass
class RunData:
    """One run folder, loaded."""

    path: str
    script: str
    args: dict
    epochs: list = field(default_factory=list)  # metrics.jsonl lines, summary line excluded
    summary: dict | None = None  # summary.json (present only when the run ended normally)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def series(self, metric: str, x: str = "env_steps"):
        """(xs, ys) over the epochs that logged `metric`."""
        rows = [e for e in self.epochs if metric in e and x in e]
        return [r[x] for r in rows], [r[metric] for r in rows]

    def score(self, metric: str) -> float:
        """Mean of the last 5 values of `metric` (the summary's `<metric>_last5` when present)."""
        if self.summary and f"{metric}_last5" in self.summary:
            return float(self.summary[f"{metric}_last5"])
        _, ys = self.series(metric)
        if not ys:
            return math.nan
        tail = ys[-SCORE_WINDOW:]
        return sum(tail) / len(tail)


def load_run(path: str) -> RunData:
    """Loads one run folder; raises ValueError if it is not one."""
    cfg_path = os.path.join(path, "config.json")
    metrics_path = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(metrics_path):
        raise ValueError(f"{path}: no metrics.jsonl (not a run folder)")
    cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    epochs = []
    with open(metrics_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interrupted run
                continue
            if not row.get("summary"):
                epochs.append(row)
    summary = None
    summary_path = os.path.join(path, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    return RunData(path=path, script=cfg.get("script", "?"), args=cfg.get("args", {}), epochs=epochs, summary=summary)


def split_seeds(run: RunData) -> list[RunData]:
    """A folder of several seeds trained in one process (crl_deep.py --num-seeds: metrics lines with a
    `seed` field, summary.json with each seed's scores under "seeds") as one RunData per seed, with its
    own lines, args["seed"] and summary; any other folder as itself."""
    seeds = sorted({e["seed"] for e in run.epochs if "seed" in e})
    if not seeds:
        return [run]
    out = []
    for seed in seeds:
        summary = None
        if run.summary is not None:
            summary = {k: run.summary[k] for k in ("summary", "epochs", "env_steps") if k in run.summary}
            summary.update(run.summary.get("seeds", {}).get(str(seed), {}))
        epochs = [e for e in run.epochs if e.get("seed") == seed]
        out.append(RunData(run.path, run.script, {**run.args, "seed": seed}, epochs, summary))
    return out


def find_runs(paths: list[str]) -> list[RunData]:
    """Every run at or below the given paths (a run folder holds metrics.jsonl): one RunData per
    folder, or per seed of a folder that holds several (split_seeds)."""
    found = []
    for p in paths:
        if not os.path.isdir(p):
            raise ValueError(f"{p}: not a directory")
        hits = sorted(glob.glob(os.path.join(p, "**", "metrics.jsonl"), recursive=True))
        # folders of interrupted attempts that tools/grid.py moved aside are not runs
        hits = [h for h in hits if not re.search(r"\.interrupted-\d+$", os.path.dirname(h))]
        found.extend(seed_run for h in hits for seed_run in split_seeds(load_run(os.path.dirname(h))))
    return found


def arg_value(run: RunData, key: str):
    """A run's Args value by name; '-' and '_' are interchangeable (tyro accepts both)."""
    key = key.replace("-", "_")
    if key == "script":
        return run.script
    if key not in run.args:
        raise ValueError(f"{run.path}: config.json args have no {key!r}; have {sorted(run.args)}")
    return run.args[key]


def atomic_write(path: str, data: bytes | str) -> None:
    """Writes `path` through a temporary file and os.replace, so readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Saves a matplotlib figure atomically (format from the extension)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)
