"""Memory over a long run: resident set size (RSS) of a training process after each epoch.

Runs a script (crl_deep.py by default) on a tiny reacher config for many short epochs in a child
process and prints one JSON line per epoch with the child's RSS, read from /proc when the epoch's
metrics line appears, then a summary line: the growth from the 5th epoch to the last should be
near zero (a leak grows with every epoch).

    python bench/rss.py --epochs 30
    python bench/rss.py --script sac_her.py --epochs 30
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "crl_deep.py": [
        "--depth",
        "4",
        "--width",
        "32",
        "--repr-dim",
        "16",
        "--batch-size",
        "32",
        "--num-envs",
        "4",
        "--num-eval-envs",
        "4",
        "--episode-length",
        "50",
        "--unroll-length",
        "10",
        "--sgd-steps-per-train-step",
        "20",
        "--replay-size",
        "200",
        "--min-replay-size",
        "20",
    ],
    "sac_her.py": [
        "--depth",
        "4",
        "--width",
        "32",
        "--batch-size",
        "32",
        "--num-envs",
        "4",
        "--num-eval-envs",
        "4",
        "--episode-length",
        "50",
        "--unroll-length",
        "10",
        "--sgd-steps-per-train-step",
        "20",
        "--replay-size",
        "200",
        "--min-replay-size",
        "20",
    ],
}
TINY["td3_her.py"] = TINY["sac_her.py"]


@dataclass
class Bench:
    script: str = "crl_deep.py"
    """crl_deep.py, sac_her.py or td3_her.py"""
    epochs: int = 30
    """epochs of the run (each: 2 unrolls of 10 steps x 4 envs, 20 SGD steps per unroll, an evaluation)"""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(bench: Bench):
    steps = 20 * 4 + bench.epochs * 2 * 10 * 4  # prefill + epochs x 2 unrolls x 10 steps x 4 envs
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [
            sys.executable,
            os.path.join(ROOT, bench.script),
            "--env",
            "reacher",
            *TINY[bench.script],
            "--num-epochs",
            str(bench.epochs),
            "--total-env-steps",
            str(steps),
            "--run-dir",
            run_dir,
            "--run-name",
            "rss",
        ]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        metrics, seen, rss = os.path.join(run_dir, "rss", "metrics.jsonl"), 0, []
        while proc.poll() is None:
            lines = open(metrics).read().count("\n") if os.path.exists(metrics) else 0
            while seen < min(lines, bench.epochs):  # lines written since the last poll share one reading
                seen += 1
                rss.append(rss_mib(proc.pid))
                print(json.dumps({"script": bench.script, "epoch": seen - 1, "rss_mib": round(rss[-1], 1)}))
            time.sleep(0.02)
        if proc.returncode != 0:
            raise SystemExit(f"error: {bench.script} failed: {proc.stderr.read()[-2000:]}")
    print(
        json.dumps(
            {
                "script": bench.script,
                "epochs": len(rss),
                "rss_mib_epoch_4": round(rss[4], 1),
                "rss_mib_last": round(rss[-1], 1),
                "growth_mib_after_epoch_4": round(rss[-1] - rss[4], 1),
            }
        )
    )


if __name__ == "__main__":
    main(tyro.cli(Bench))
