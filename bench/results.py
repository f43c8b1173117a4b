"""Turns a benchmark's JSON lines into a dated bench/RESULTS.md section (machine, versions, command, table).

    python bench/rss.py --epochs 30 > /tmp/rss.jsonl
    python bench/results.py /tmp/rss.jsonl --title "Memory over a long run" \
        --command "python bench/rss.py --epochs 30" >> bench/RESULTS.md

Lines with the same set of keys become the rows of one table (columns in first-seen order; one table per
set of keys that two or more lines share, the most common first); other lines (summaries) are listed
below the tables as they are.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import sys
from importlib import metadata


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = f"{names[0]} x {len(names)}" if names else cpu
    return f"{cpu}, {platform.system()} {platform.release()}"


def versions() -> str:
    names = ("jax", "jaxlib", "flax", "brax", "mujoco")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found + [f"Python {platform.python_version()}"])


def section(rows: list[dict], title: str, command: str, note: str = "") -> str:
    """The Markdown section for `rows` (parsed JSON lines): one table per set of keys that two or more
    rows share (the most common first), the remaining rows listed as they are."""
    shapes = collections.Counter(tuple(r) for r in rows)
    tables = [shape for shape, count in shapes.most_common() if count >= 2] or [shapes.most_common(1)[0][0]]
    others = [r for r in rows if tuple(r) not in tables]
    out = [f"## {title}", "", f"{datetime.date.today().isoformat()}, {machine()}; {versions()}.", f"`{command}`"]
    if note:
        out += ["", note]
    for columns in tables:
        out += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows if tuple(r) == columns]
    if others:
        out += [""] + [f"`{json.dumps(r)}`  " for r in others]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", help="a benchmark's output: one JSON object per line (other lines skipped)")
    parser.add_argument("--title", required=True)
    parser.add_argument("--command", required=True, help="the command that produced the file")
    parser.add_argument("--note", default="", help="a sentence on the conditions (e.g. a shared machine)")
    args = parser.parse_args(argv)
    rows = []
    with open(args.jsonl) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    if not rows:
        print(f"error: {args.jsonl}: no JSON lines", file=sys.stderr)
        return 1
    sys.stdout.write("\n" + section(rows, args.title, args.command, args.note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
