"""crl_deep.py --num-seeds: N agents in one process equal N runs of their own seeds; the run folder's
metrics lines, summary, checkpoint, buffer files, resume and wandb runs of a multi-seed run."""

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
    "8",
    "--episode-length",
    "50",
    "--unroll-length",
    "10",
    "--sgd-steps-per-train-step",
    "10",
    "--replay-size",
    "200",
    "--min-replay-size",
    "20",
    "--num-epochs",
    "3",
    "--total-env-steps",
    str(80 + 3 * 2 * 40),  # prefill 80, then 2 training steps of 4 envs x 10 steps per epoch
    "--save-buffer",
]
VOLATILE = ("wall_time", "sps", "epoch_seconds", "compile_seconds")


def _env(**extra):
    env = dict(os.environ, **{"WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu", **extra})
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
    return env


def _cmd(*extra):
    return [sys.executable, os.path.join(ROOT, "crl_deep.py"), *extra]


def _run(*extra, **env):
    proc = subprocess.run(_cmd(*extra), cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _lines(run_path):
    with open(os.path.join(run_path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-seed run (seeds 3, 4; tracked by wandb offline), SIGKILLed after its first checkpoint and
    resumed, and the runs of seed 3 and seed 4 alone. Returns (run dir, the epoch resumed after or None)."""
    run_dir = tmp_path_factory.mktemp("seeds")
    wandb_dir = run_dir / "wandb_files"
    wandb_dir.mkdir()
    wandb_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    two = [*TINY, "--seed", str(SEED), "--num-seeds", "2", "--run-dir", str(run_dir), "--run-name", "two", "--track"]
    proc = subprocess.Popen(
        _cmd(*two), cwd=ROOT, env=_env(**wandb_env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    while proc.poll() is None and not (run_dir / "two" / "checkpoint.msgpack").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate()[1]
    assert (run_dir / "two" / "checkpoint.msgpack").exists(), stderr.decode()[-3000:]
    resumed_after = None
    if not (run_dir / "two" / "summary.json").exists():  # it exists only if this process was starved
        resumed_after = runkit.load_checkpoint(str(run_dir / "two"), "crl_deep")["epoch"]  # never a torn one
        assert resumed_after in (0, 1, 2)
        _run("--resume", str(run_dir / "two"), **wandb_env)
    for seed in (SEED, SEED + 1):
        _run(*TINY, "--seed", str(seed), "--run-dir", str(run_dir), "--run-name", f"alone{seed}")
    return run_dir, resumed_after


def test_each_seed_equals_the_run_of_its_own_seed(runs):
    """Also the resume test: the 2-seed run was killed and resumed (with its buffer files)."""
    runs, _ = runs
    lines = _lines(runs / "two")[:-1]
    assert [(m["epoch"], m["seed"]) for m in lines] == [(e, s) for e in range(3) for s in (SEED, SEED + 1)]
    for seed in (SEED, SEED + 1):
        got = [m for m in lines if m["seed"] == seed]
        want = _lines(runs / f"alone{seed}")[:-1]
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


def test_evaluate_picks_one_seed_and_repeats_its_logged_evaluation(runs):
    from tools.evaluate import evaluate

    runs, _ = runs
    with pytest.raises(ValueError, match="pick one with --run-seed"):
        evaluate(str(runs / "two"))
    with pytest.raises(ValueError, match="is not one of the run's seeds"):
        evaluate(str(runs / "two"), run_seed=SEED + 2)
    logged = {m["seed"]: m for m in _lines(runs / "two")[:-1] if m["epoch"] == 2}
    for seed in (SEED, SEED + 1):
        got = evaluate(str(runs / "two"), run_seed=seed)
        assert got["epoch"] == 2 and got["same_as_run"] and got["run_seed"] == seed
        assert got["eval/episode_success"] == logged[seed]["eval/episode_success"]
        assert got["eval/episode_dist"] == pytest.approx(logged[seed]["eval/episode_dist"], rel=1e-5)


def test_checkpoint_and_buffers_hold_every_seed(runs):

    runs, _ = runs
    stacked = runkit.load_checkpoint(str(runs / "two"), "crl_deep")
    assert stacked["epoch"] == 2 and stacked["args"]["num_seeds"] == 2 and stacked["args"]["seed"] == SEED
    for i, seed in enumerate((SEED, SEED + 1)):
        alone = runkit.load_checkpoint(str(runs / f"alone{seed}"), "crl_deep")
        flat_stacked = dict(_flat(stacked["state"]))
        for path, leaf in _flat(alone["state"]):
            assert flat_stacked[path].shape == (2, *np.shape(leaf)), path
            if not path.startswith("/env_state/"):  # params, optimizer states, alpha, key (physics drifts more)
                np.testing.assert_allclose(flat_stacked[path][i], leaf, rtol=1e-4, atol=1e-5, err_msg=path)
        np.testing.assert_array_equal(
            stacked["state"]["env_state"]["info"]["traj_id"][i], alone["state"]["env_state"]["info"]["traj_id"]
        )
        mine, theirs = np.load(runs / "two" / f"buffer_s{seed}.npz"), np.load(runs / f"alone{seed}" / "buffer.npz")
        assert set(mine) == set(theirs) and int(mine["_epoch"]) == 2
        np.testing.assert_array_equal(mine["_traj_id"], theirs["_traj_id"])
        np.testing.assert_allclose(mine["observations"], theirs["observations"], rtol=1e-4, atol=1e-4)
    assert not (runs / "two" / "buffer.npz").exists()


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}/{k}")
        else:
            yield f"{prefix}/{k}", np.asarray(v)


def test_summary_holds_each_seed_and_their_mean_and_std(runs):
    runs, _ = runs
    lines = _lines(runs / "two")
    summary = json.loads((runs / "two" / "summary.json").read_text())
    assert summary == lines[-1] and summary["summary"] is True
    assert summary["num_seeds"] == 2 and summary["epochs"] == 3 and summary["env_steps"] == 320
    assert set(summary["seeds"]) == {str(SEED), str(SEED + 1)}
    key = "eval/episode_dist_last5"
    for seed, own in summary["seeds"].items():
        values = [m["eval/episode_dist"] for m in lines[:-1] if m["seed"] == int(seed)]
        assert own[key] == pytest.approx(np.mean(values[-5:]))
        alone = json.loads((runs / f"alone{seed}" / "summary.json").read_text())
        assert own[key] == pytest.approx(alone[key], rel=1e-4)
    scores = [own[key] for own in summary["seeds"].values()]
    assert summary[key] == pytest.approx(np.mean(scores)) and summary[key + "_std"] == pytest.approx(np.std(scores))
    assert summary[key + "_std"] > 0


def test_table1_reads_the_two_seeds_apart(runs):
    from tools import table1

    runs, _ = runs
    found = [r for r in table1.run_files.find_runs([str(runs)]) if os.path.basename(r.path) == "two"]
    assert [r.args["seed"] for r in found] == [SEED, SEED + 1] and all(r.finished for r in found)
    (row,) = table1.table_rows(found)
    summary = json.loads((runs / "two" / "summary.json").read_text())
    assert row["seeds"] == 2 and row["mean"] == pytest.approx(summary["eval/episode_success_last5"])


def test_wandb_offline_one_run_per_seed(runs):
    runs, resumed_after = runs
    folders = sorted(glob.glob(str(runs / "wandb_files" / "wandb" / "offline-run-*")))
    ids = [f.rsplit("-", 1)[-1] for f in folders]  # offline-run-<time>-<id>; a resumed run adds a folder per seed
    assert sorted(set(ids)) == [f"two__s{SEED}", f"two__s{SEED + 1}"] and len(ids) == 2 * (
        1 + (resumed_after is not None)
    )
    for folder, run_id in zip(folders, ids):
        assert os.path.getsize(os.path.join(folder, f"run-{run_id}.wandb")) > 0


def test_resume_of_a_two_seed_run(runs):
    """The resumed run's lines: no epoch twice, every seed of every epoch (their values: the test above)."""
    runs, resumed_after = runs
    lines = _lines(runs / "two")
    assert [(m["epoch"], m["seed"]) for m in lines[:-1]] == [(e, s) for e in range(3) for s in (SEED, SEED + 1)]
    assert {m["compile_seconds"] > 0 for m in lines[:-1] if "compile_seconds" in m} == {True}
    first_epochs = [m["epoch"] for m in lines[:-1] if "compile_seconds" in m]  # first epoch of each process
    assert first_epochs == [0, 0] + ([resumed_after + 1] * 2 if resumed_after in (0, 1) else [])
    if resumed_after is None:
        pytest.skip("the 2-seed run finished before the SIGKILL landed: nothing was resumed")


@pytest.mark.slow  # one more compile of the 2-seed program (~20-40 s)
def test_two_devices_hold_one_seed_each_and_agree(runs, tmp_path):
    """With 2 (forced CPU) devices the seeds are split over them (shard_map): the same lines as on one."""
    runs, _ = runs
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    argv = [*TINY, "--seed", str(SEED), "--num-seeds", "2", "--run-dir", str(tmp_path), "--run-name", "dev2"]
    proc = _run(*argv, XLA_FLAGS=xla_flags)
    assert "2 device(s)" in proc.stderr
    got, want = _lines(tmp_path / "dev2")[:-1], _lines(runs / "two")[:-1]
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
