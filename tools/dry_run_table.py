"""The memory and compute table of docs/dry_run.md: `crl_deep.py --dry-run` over depth x batch x remat.

    python -m tools.dry_run_table                                   # humanoid_u_maze, the paper's settings
    python -m tools.dry_run_table --depths 4 16 --batch-sizes 256   # a smaller grid
    python -m tools.dry_run_table --jsonl dry_runs.jsonl -- --width 512   # keep the JSON lines; extra flags

Every configuration is its own `crl_deep.py --dry-run` subprocess (its own compile; nothing written), run
one after another, on whatever backend jax finds. The paper's settings are crl_deep.py's defaults (512
envs, replay 10,000 steps per env, width 256, unroll 62, 800 SGD steps per training step); arguments
after `--` go to every run.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too

import argparse
import json
import platform
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def dry_run(env: str, depth: int, batch_size: int, remat: bool, extra: list) -> dict:
    """One `crl_deep.py --dry-run`: its JSON line, or {"error": the last stderr line}."""
    command = [sys.executable, os.path.join(ROOT, "crl_deep.py"), "--dry-run", "--env", env]
    command += ["--depth", str(depth), "--batch-size", str(batch_size), "--remat" if remat else "--no-remat", *extra]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": last, "args": {"depth": depth, "batch_size": batch_size, "remat": remat}}
    return json.loads(lines[-1])


def table(reports: list) -> str:
    """Markdown rows: one per dry run, sizes in GiB, FLOPs in GFLOP."""
    head = (
        "| depth | batch | remat | parameters (M) | GFLOP per SGD step | replay buffer (GiB) | arguments (GiB) "
        "| temporaries (GiB) | est. peak (GiB) | compile (s) |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in reports:
        a = r["args"]
        start = f"| {a['depth']} | {a['batch_size']} | {'on' if a['remat'] else 'off'} |"
        if "error" in r:
            rows.append(f"{start} failed: {r['error']} |||||||")
            continue
        m = r["memory"]
        rows.append(
            f"{start} {r['params_total'] / 1e6:.2f} | {r['flops_per_sgd_step'] / 1e9:.2f} | "
            f"{r['buffer_bytes'] / GIB:.2f} | {m['argument_bytes'] / GIB:.2f} | {m['temp_bytes'] / GIB:.2f} | "
            f"{r['peak_bytes'] / GIB:.2f} | {r['compile_seconds']:.0f} |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="humanoid_u_maze")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64, 256, 1024])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--jsonl", help="also append every dry run's JSON line to this file")
    args = parser.parse_args(argv)
    reports = []
    for depth in args.depths:
        for batch_size in args.batch_sizes:
            for remat in (False, True):
                start = time.time()
                report = dry_run(args.env, depth, batch_size, remat, extra)
                reports.append(report)
                status = report.get("error", f"peak {report.get('peak_bytes', 0) / GIB:.2f} GiB")
                print(
                    f"depth {depth} batch {batch_size} remat {remat}: {status} ({time.time() - start:.0f} s)",
                    file=sys.stderr,
                )
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(report) + "\n")
    done = next((r for r in reports if "error" not in r), {})
    print(
        f"`{' '.join(['crl_deep.py --dry-run --env', args.env, *extra])}`: backend {done.get('backend')} "
        f"({done.get('device_kind')}, {done.get('device_count')} device(s)), jax {done.get('jax')}, "
        f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d', time.gmtime())}\n"
    )
    print(table(reports))
    return 0 if all("error" not in r for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
