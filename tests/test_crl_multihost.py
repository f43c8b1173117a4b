"""crl_deep.py as 2 processes on one machine (jax.distributed, gloo CPU collectives, one CPU device
each) gives the metrics of the single-process 2-device run; only process 0 writes the run folder.
Slow (minutes: two compiles side by side and CPU collectives on every SGD step): pytest -m slow."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--env",
    "reacher",
    "--depth",
    "4",
    "--width",
    "16",
    "--repr-dim",
    "8",
    "--batch-size",
    "16",
    "--num-envs",
    "4",
    "--num-eval-envs",
    "2",
    "--episode-length",
    "20",
    "--unroll-length",
    "5",
    "--sgd-steps-per-train-step",
    "4",
    "--replay-size",
    "40",
    "--min-replay-size",
    "10",
    "--num-epochs",
    "2",
    "--total-env-steps",
    "120",
    "--seed",
    "1",
]
VOLATILE = ("wall_time", "sps", "epoch_seconds", "compile_seconds")


def stable_lines(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in f]


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, os.path.join(ROOT, "crl_deep.py"), *TINY, "--run-dir", str(tmp_path)]
    port = free_port()
    procs = [
        subprocess.Popen(
            [*cmd, "--run-name", "two_processes"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **env,
                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
            },
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert outputs[0][0].strip().startswith('{"summary": true') and outputs[1][0].strip() == ""  # process 0 reports
    two_devices = {**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"}
    proc = subprocess.run(
        [*cmd, "--run-name", "two_devices"], cwd=ROOT, env=two_devices, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = stable_lines(tmp_path / "two_processes"), stable_lines(tmp_path / "two_devices")
    assert len(got) == 3 and got == want
    assert sorted(os.listdir(tmp_path / "two_processes")) == [
        "checkpoint.msgpack",
        "config.json",
        "metrics.jsonl",
        "summary.json",
    ]
