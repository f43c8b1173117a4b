"""crl_deep.py end to end on reacher, as subprocesses: files, resume after SIGKILL, determinism, a fork,
depth 1024, the CLI's one-line errors; --num-seeds: N agents in one process equal N runs of their own
seeds (metrics lines, summary, checkpoint, buffer files, resume and wandb runs of a multi-seed run).

One tiny config (TINY) for every run here, so its programs compile once (the persistent cache) and the
reference run is also the seed-3 run the 2-seed run is compared with."""

import dataclasses
import glob
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
SEED = 3
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
    str(SEED),
]
VOLATILE = ("wall_time", "sps", "epoch_seconds", "compile_seconds")


def _env(devices=1, **extra):
    env = dict(os.environ, **{"WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu", **extra})
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
    if devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return env


def _cmd(*extra):
    return [sys.executable, os.path.join(ROOT, "crl_deep.py"), *extra]


def _run(*extra, devices=1, **env):
    return subprocess.run(_cmd(*extra), cwd=ROOT, env=_env(devices, **env), capture_output=True, text=True, timeout=600)


def _lines(run_path):
    with open(os.path.join(run_path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _load(run_path):
    return runkit.load_checkpoint(str(run_path), "crl_deep")


def _stable(line):
    return {k: v for k, v in line.items() if k not in VOLATILE}


def _sigkill_after_first_checkpoint(cmd, cwd, env, run_path):
    """Starts `cmd` and SIGKILLs it as soon as `run_path` holds a checkpoint. Returns that checkpoint's epoch
    (a whole checkpoint, never a torn one), or None when the run finished first (only if this process was
    starved)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None and not (run_path / "checkpoint.msgpack").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate()[1].decode()
    assert (run_path / "checkpoint.msgpack").exists(), stderr[-3000:]
    if (run_path / "summary.json").exists():
        return None
    epoch = _load(run_path)["epoch"]
    assert epoch in (0, 1, 2)  # epoch 2 when this process was starved past the last checkpoint
    return epoch


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


@pytest.mark.slow  # CI time (25 s); every multi-device run is a slow test, CI runs the same code on a 1-device mesh
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


def test_a_fork_trains_and_resumes_after_sigkill_exactly_as_the_reference(reference_run, tmp_path):
    """The user story "copy the script to fork an idea": crl_deep.py under another name in an empty folder,
    beside copies of envs/ and runkit/ only. Its run with the reference's seed is SIGKILLed mid-run and
    resumed: every line equals the reference's (determinism, and resume continues exactly)."""
    import shutil

    fork = tmp_path / "fork"
    fork.mkdir()
    shutil.copy(os.path.join(ROOT, "crl_deep.py"), fork / "my_crl_idea.py")
    for package in ("envs", "runkit"):
        shutil.copytree(os.path.join(ROOT, package), fork / package, ignore=shutil.ignore_patterns("__pycache__"))
    run_path = fork / "runs" / "fork"
    cmd = [sys.executable, "my_crl_idea.py", *TINY, "--run-dir", "runs", "--run-name", "fork", "--save-buffer"]
    killed = _sigkill_after_first_checkpoint(cmd, fork, _env(), run_path) is not None
    if killed:
        resume = [sys.executable, "my_crl_idea.py", "--resume", str(run_path)]
        resumed = subprocess.run(resume, cwd=fork, env=_env(), capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(os.listdir(fork)) == ["envs", "my_crl_idea.py", "runkit", "runs"]
    assert [_stable(m) for m in _lines(run_path)] == [_stable(m) for m in _lines(reference_run)]
    if not killed:
        pytest.skip("the fork trained the reference's lines, but finished before the SIGKILL landed")


# ---------------------------------------------------------------- --num-seeds


@pytest.fixture(scope="module")
def seed_runs(reference_run, tmp_path_factory):
    """A 2-seed run (seeds 3, 4; tracked by wandb offline), SIGKILLed after its first checkpoint and
    resumed, and the run of seed 4 alone (seed 3's is the reference run). Returns ({name: run folder}, the
    epoch resumed after or None)."""
    run_dir = tmp_path_factory.mktemp("seeds")
    wandb_dir = run_dir / "wandb_files"
    wandb_dir.mkdir()
    wandb_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    two = [*TINY, "--save-buffer", "--num-seeds", "2", "--run-dir", str(run_dir), "--run-name", "two", "--track"]
    resumed_after = _sigkill_after_first_checkpoint(_cmd(*two), ROOT, _env(**wandb_env), run_dir / "two")
    if resumed_after is not None:
        proc = _run("--resume", str(run_dir / "two"), **wandb_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    alone = [*TINY, "--save-buffer", "--run-dir", str(run_dir), "--run-name", f"alone{SEED + 1}"]
    alone[alone.index("--seed") + 1] = str(SEED + 1)
    proc = _run(*alone)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"two": run_dir / "two", SEED: reference_run, SEED + 1: run_dir / f"alone{SEED + 1}"}, resumed_after


def test_each_seed_equals_the_run_of_its_own_seed(seed_runs):
    """Also the resume test: the 2-seed run was killed and resumed (with its buffer files)."""
    runs, _ = seed_runs
    lines = _lines(runs["two"])[:-1]
    assert [(m["epoch"], m["seed"]) for m in lines] == [(e, s) for e in range(3) for s in (SEED, SEED + 1)]
    for seed in (SEED, SEED + 1):
        got = [m for m in lines if m["seed"] == seed]
        want = _lines(runs[seed])[:-1]
        assert len(got) == len(want) == 3 and all("seed" not in m for m in want)  # one seed: lines as before
        for g, w in zip(got, want):
            assert set(g) - {"seed", *VOLATILE} == set(w) - set(VOLATILE) and g["env_steps"] == w["env_steps"]
            for k in w:
                if k.startswith("training/") or k == "eval/episode_dist":
                    assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (seed, g["epoch"], k)
            assert g["eval/episode_success"] == w["eval/episode_success"]
            assert g["eval/episode_success_any"] == w["eval/episode_success_any"]
    # the comparison tells seeds apart: seed 3's losses are not seed 4's
    first = [m for m in lines if m["epoch"] == 0]
    assert first[0]["training/critic_loss"] != pytest.approx(first[1]["training/critic_loss"], rel=1e-4)


def test_evaluate_picks_one_seed_and_repeats_its_logged_evaluation(seed_runs):
    from tools.evaluate import evaluate

    runs, _ = seed_runs
    with pytest.raises(ValueError, match="pick one with --run-seed"):
        evaluate(str(runs["two"]))
    with pytest.raises(ValueError, match="is not one of the run's seeds"):
        evaluate(str(runs["two"]), run_seed=SEED + 2)
    logged = {m["seed"]: m for m in _lines(runs["two"])[:-1] if m["epoch"] == 2}
    for seed in (SEED, SEED + 1):
        got = evaluate(str(runs["two"]), run_seed=seed)
        assert got["epoch"] == 2 and got["same_as_run"] and got["run_seed"] == seed
        assert got["eval/episode_success"] == logged[seed]["eval/episode_success"]
        assert got["eval/episode_dist"] == pytest.approx(logged[seed]["eval/episode_dist"], rel=1e-5)


def test_checkpoint_and_buffers_hold_every_seed(seed_runs):
    runs, _ = seed_runs
    stacked = _load(runs["two"])
    assert stacked["epoch"] == 2 and stacked["args"]["num_seeds"] == 2 and stacked["args"]["seed"] == SEED
    for i, seed in enumerate((SEED, SEED + 1)):
        alone = _load(runs[seed])
        flat_stacked = dict(_flat(stacked["state"]))
        for path, leaf in _flat(alone["state"]):
            assert flat_stacked[path].shape == (2, *np.shape(leaf)), path
            if not path.startswith("/env_state/"):  # params, optimizer states, alpha, key (physics drifts more)
                np.testing.assert_allclose(flat_stacked[path][i], leaf, rtol=1e-4, atol=1e-5, err_msg=path)
        np.testing.assert_array_equal(
            stacked["state"]["env_state"]["info"]["traj_id"][i], alone["state"]["env_state"]["info"]["traj_id"]
        )
        mine, theirs = np.load(runs["two"] / f"buffer_s{seed}.npz"), np.load(runs[seed] / "buffer.npz")
        assert set(mine) == set(theirs) and int(mine["_epoch"]) == 2
        np.testing.assert_array_equal(mine["_traj_id"], theirs["_traj_id"])
        np.testing.assert_allclose(mine["observations"], theirs["observations"], rtol=1e-4, atol=1e-4)
    assert not (runs["two"] / "buffer.npz").exists()


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}/{k}")
        else:
            yield f"{prefix}/{k}", np.asarray(v)


def test_summary_holds_each_seed_and_their_mean_and_std(seed_runs):
    runs, _ = seed_runs
    lines = _lines(runs["two"])
    summary = json.loads((runs["two"] / "summary.json").read_text())
    assert summary == lines[-1] and summary["summary"] is True
    assert summary["num_seeds"] == 2 and summary["epochs"] == 3 and summary["env_steps"] == 320
    assert set(summary["seeds"]) == {str(SEED), str(SEED + 1)}
    key = "eval/episode_dist_last5"
    for seed, own in summary["seeds"].items():
        values = [m["eval/episode_dist"] for m in lines[:-1] if m["seed"] == int(seed)]
        assert own[key] == pytest.approx(np.mean(values[-5:]))
        alone = json.loads((runs[int(seed)] / "summary.json").read_text())
        assert own[key] == pytest.approx(alone[key], rel=1e-4)
    scores = [own[key] for own in summary["seeds"].values()]
    assert summary[key] == pytest.approx(np.mean(scores)) and summary[key + "_std"] == pytest.approx(np.std(scores))
    assert summary[key + "_std"] > 0


def test_table1_reads_the_two_seeds_apart(seed_runs):
    from tools import table1

    runs, _ = seed_runs
    found = [r for r in table1.run_files.find_runs([str(runs["two"].parent)]) if os.path.basename(r.path) == "two"]
    assert [r.args["seed"] for r in found] == [SEED, SEED + 1] and all(r.finished for r in found)
    (row,) = table1.table_rows(found)
    summary = json.loads((runs["two"] / "summary.json").read_text())
    assert row["seeds"] == 2 and row["mean"] == pytest.approx(summary["eval/episode_success_last5"])


def test_wandb_offline_one_run_per_seed(seed_runs):
    runs, resumed_after = seed_runs
    folders = sorted(glob.glob(str(runs["two"].parent / "wandb_files" / "wandb" / "offline-run-*")))
    ids = [f.rsplit("-", 1)[-1] for f in folders]  # offline-run-<time>-<id>; a resumed run adds a folder per seed
    assert sorted(set(ids)) == [f"two__s{SEED}", f"two__s{SEED + 1}"] and len(ids) == 2 * (
        1 + (resumed_after is not None)
    )
    for folder, run_id in zip(folders, ids):
        assert os.path.getsize(os.path.join(folder, f"run-{run_id}.wandb")) > 0


def test_resume_of_a_two_seed_run(seed_runs):
    """The resumed run's lines: no epoch twice, every seed of every epoch (their values: the test above)."""
    runs, resumed_after = seed_runs
    lines = _lines(runs["two"])
    assert [(m["epoch"], m["seed"]) for m in lines[:-1]] == [(e, s) for e in range(3) for s in (SEED, SEED + 1)]
    assert {m["compile_seconds"] > 0 for m in lines[:-1] if "compile_seconds" in m} == {True}
    first_epochs = [m["epoch"] for m in lines[:-1] if "compile_seconds" in m]  # first epoch of each process
    assert first_epochs == [0, 0] + ([resumed_after + 1] * 2 if resumed_after in (0, 1) else [])
    if resumed_after is None:
        pytest.skip("the 2-seed run finished before the SIGKILL landed: nothing was resumed")


@pytest.mark.slow  # one more compile of the 2-seed program (~20-40 s)
def test_two_devices_hold_one_seed_each_and_agree(seed_runs, tmp_path):
    """With 2 (forced CPU) devices the seeds are split over them (shard_map): the same lines as on one."""
    runs, _ = seed_runs
    proc = _run(*TINY, "--num-seeds", "2", "--run-dir", str(tmp_path), "--run-name", "dev2", devices=2)
    assert "2 device(s)" in proc.stderr
    got, want = _lines(tmp_path / "dev2")[:-1], _lines(runs["two"])[:-1]
    assert [(m["epoch"], m["seed"]) for m in got] == [(m["epoch"], m["seed"]) for m in want]
    for g, w in zip(got, want):
        for k in w:
            if k.startswith("training/") or k == "eval/episode_dist":
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (g["seed"], g["epoch"], k)
        assert g["eval/episode_success"] == w["eval/episode_success"]


# ---------------------------------------------------------------- in process: inputs, RunLog with wandb


def test_bad_num_seeds_fails_with_one_line():
    import crl_deep

    args = crl_deep.Args(env="reacher", num_envs=4, batch_size=16, min_replay_size=20, unroll_length=10)
    with pytest.raises(SystemExit, match=r"^error: --num-seeds must be positive \(got 0\)$"):
        crl_deep.check_args(dataclasses.replace(args, num_seeds=0), num_devices=1)
    with pytest.raises(SystemExit, match=r"^error: --num-seeds 3 is not divisible by the 2 devices"):
        crl_deep.check_args(dataclasses.replace(args, num_seeds=3), num_devices=2)
    crl_deep.check_args(dataclasses.replace(args, num_seeds=4, num_envs=3, batch_size=15), num_devices=2)
