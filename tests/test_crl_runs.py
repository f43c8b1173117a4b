"""crl_deep.py end to end on reacher, as subprocesses: files, resume after SIGKILL, determinism,
1 vs 2 devices, depth 1024, the CLI's one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import runkit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--env",
    "reacher",
    "--depth",
    "8",
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
    "60",
    "--replay-size",
    "200",
    "--min-replay-size",
    "20",
    "--num-epochs",
    "3",
    "--total-env-steps",
    str(80 + 3 * 2 * 40),
    "--seed",
    "3",
]
VOLATILE = ("wall_time", "sps", "epoch_seconds", "compile_seconds")


def _env(devices=1):
    env = dict(os.environ, WANDB_MODE="disabled", JAX_PLATFORMS="cpu")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
    if devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return env


def _cmd(*extra):
    return [sys.executable, os.path.join(ROOT, "crl_deep.py"), *extra]


def _run(*extra, devices=1):
    return subprocess.run(_cmd(*extra), cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=600)


def _lines(run_path):
    with open(os.path.join(run_path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _load(run_path):

    return runkit.load_checkpoint(str(run_path), "crl_deep")


def _stable(line):
    return {k: v for k, v in line.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("crl")
    proc = _run(*TINY, "--run-dir", str(run_dir), "--run-name", "ref", "--save-buffer")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "ref"


@pytest.mark.slow  # CI time (17 s); --dry-run itself runs in CI in tests/test_dry_run.py
def test_dry_run_of_a_resume_plans_the_run_and_writes_nothing(reference_run):
    before = {f: os.stat(reference_run / f).st_mtime_ns for f in os.listdir(reference_run)}
    proc = _run("--resume", str(reference_run), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    config = json.loads((reference_run / "config.json").read_text())
    assert {**report["args"], "dry_run": False, "resume": None} == config["args"]  # the run's own settings

    params = _load(reference_run)["state"]["params"]  # the checkpoint's own parameter counts
    assert report["params"] == {name: runkit.tree_size(tree) for name, tree in params.items()}
    assert {f: os.stat(reference_run / f).st_mtime_ns for f in os.listdir(reference_run)} == before


def test_tiny_run_writes_config_metrics_checkpoint_buffer(reference_run):
    config = json.loads((reference_run / "config.json").read_text())
    assert config["script"] == "crl_deep" and config["args"]["depth"] == 8
    assert {"jax", "jaxlib", "flax", "optax", "brax", "mujoco", "python"} <= set(config["versions"])
    assert config["xla_flags"] == _env().get("XLA_FLAGS", "")  # recorded for reproducibility
    lines = _lines(reference_run)
    assert [m.get("epoch") for m in lines[:-1]] == [0, 1, 2] and lines[-1]["summary"] is True
    assert [m["env_steps"] for m in lines[:-1]] == [160, 240, 320]
    for m in lines[:-1]:
        assert 0 <= m["eval/episode_success"] <= 50 and m["sps"] > 0
        assert {
            "training/critic_loss",
            "training/actor_loss",
            "training/alpha",
            "training/entropy",
            "training/logits_pos",
            "training/logits_neg",
            "eval/episode_success_any",
            "eval/episode_dist",
        } <= set(m)
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary == lines[-1]
    assert summary["eval/episode_success_last5"] == pytest.approx(
        np.mean([m["eval/episode_success"] for m in lines[:-1]])
    )
    ckpt = _load(reference_run)
    assert ckpt["header"]["script"] == "crl_deep" and ckpt["header"]["depths"]["depth"] == 8
    assert ckpt["epoch"] == 2 and ckpt["env_steps"] == 320 and ckpt["args"]["depth"] == 8
    assert set(ckpt["params"]) == {"actor", "sa_encoder", "g_encoder"}
    data = np.load(reference_run / "buffer.npz")
    stored = 20 + 3 * 2 * 10  # prefill + 3 epochs x 2 unrolls of 10 steps, per env
    assert data["observations"].shape == (4 * stored, 10) and data["actions"].shape == (4 * stored, 2)
    assert data["terminals"].shape == (4 * stored,) and data["terminals"].sum() >= 4
    assert not list(reference_run.glob("*.tmp"))


def test_same_seed_is_deterministic_and_resume_after_sigkill_continues_exactly(reference_run, tmp_path):
    """Run again with the same seed, SIGKILL it mid-run, resume: every line equals the reference."""
    run_path = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(*TINY, "--run-dir", str(tmp_path), "--run-name", "killed", "--save-buffer"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None and not (run_path / "checkpoint.msgpack").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = not (run_path / "summary.json").exists()  # False only if this process was starved
    if killed:
        # a whole checkpoint, never a torn one (epoch 2 when this process was starved past the last one)
        assert _load(run_path)["epoch"] in (0, 1, 2)
        resumed = _run("--resume", str(run_path))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = _lines(run_path), _lines(reference_run)
    assert [_stable(m) for m in got] == [_stable(m) for m in want]
    if not killed:
        pytest.skip("determinism checked, but the run finished before the SIGKILL landed")


@pytest.mark.slow  # CI time (25 s); the seed axis on a device mesh runs in CI in tests/test_crl_seeds.py
def test_two_devices_agree_with_one(reference_run, tmp_path):
    # the reference's first 2 epochs: same training steps per epoch, same eval keys
    two_epochs = [*TINY[:-4], "--num-epochs", "2", "--total-env-steps", str(80 + 2 * 2 * 40), *TINY[-2:]]
    proc = _run(*two_epochs, "--run-dir", str(tmp_path), "--run-name", "two", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = _lines(tmp_path / "two")[:-1], _lines(reference_run)[:2]
    assert len(got) == 2
    for g, w in zip(got, want):
        assert g["env_steps"] == w["env_steps"]
        for k in w:
            if k.startswith("training/"):
                assert g[k] == pytest.approx(w[k], rel=1e-3, abs=1e-3), k
    assert got[-1]["eval/episode_dist"] == pytest.approx(want[-1]["eval/episode_dist"], rel=1e-2)


def test_depth_1024_compiles_and_trains_one_epoch(tmp_path):
    proc = _run(
        "--env",
        "reacher",
        "--depth",
        "1024",
        "--width",
        "16",
        "--repr-dim",
        "8",
        "--batch-size",
        "8",
        "--num-envs",
        "2",
        "--num-eval-envs",
        "2",
        "--episode-length",
        "10",
        "--unroll-length",
        "5",
        "--sgd-steps-per-train-step",
        "1",
        "--replay-size",
        "20",
        "--min-replay-size",
        "10",
        "--num-epochs",
        "1",
        "--total-env-steps",
        "30",
        "--run-dir",
        str(tmp_path),
        "--run-name",
        "deep",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = _lines(tmp_path / "deep")[:-1]
    assert line["env_steps"] == 30 and np.isfinite(line["training/critic_loss"])
    blocks = _load(tmp_path / "deep")["params"]["actor"]["params"]["tower"]["blocks"]
    assert blocks["Dense_0"]["kernel"].shape == (256, 16, 16)


def test_cli_bad_input_is_one_line_before_compiling(tmp_path):
    proc = _run("--env", "reacher", "--depth", "6", "--run-dir", str(tmp_path))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: --depth must be a positive multiple of 4 (got 6)"]
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_fork_trains_from_a_folder_holding_only_its_copy_envs_and_runkit(reference_run, tmp_path):
    """The user story "copy the script to fork an idea": crl_deep.py under another name in an empty folder,
    beside copies of envs/ and runkit/ only, trains the same run (every line equal to the reference's)."""
    import shutil

    fork = tmp_path / "fork"
    fork.mkdir()
    shutil.copy(os.path.join(ROOT, "crl_deep.py"), fork / "my_crl_idea.py")
    for package in ("envs", "runkit"):
        shutil.copytree(os.path.join(ROOT, package), fork / package, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "my_crl_idea.py", *TINY, "--run-dir", "runs", "--run-name", "fork"]
    proc = subprocess.run(cmd, cwd=fork, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(fork)) == ["envs", "my_crl_idea.py", "runkit", "runs"]
    assert [_stable(m) for m in _lines(fork / "runs" / "fork")] == [_stable(m) for m in _lines(reference_run)]
