"""Trustworthy runs, for every script: input validated before anything compiles (one line naming the flag),
and a non-finite loss stopping the run at its epoch with the last good checkpoint intact. (Checkpoint files,
--resume and the other host behaviour are runkit's, tested once in tests/test_runkit.py.)"""

import dataclasses
import importlib
import json
import math
import os
import runpy
import sys

import numpy as np
import pytest

import runkit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("crl_deep", "sac_her", "td3_her", "gcbc", "offline_crl")


def module(name):
    return importlib.import_module(name)


def base_args(name, tmp_path):
    """Args that pass every check (offline_crl needs an existing dataset file)."""
    m = module(name)
    if name == "offline_crl":
        (tmp_path / "d.npz").write_bytes(b"")
        return m.Args(dataset=str(tmp_path / "d.npz"), env="reacher")
    return m.Args(env="reacher")


def check(name, args):
    m = module(name)
    if name == "offline_crl":
        m.check_args(args)
    else:
        m.check_args(args, ("reacher",), 1)


# flag, bad value, words the one-line error must hold; a row applies to every script with that flag
BAD_INPUT = [
    ("actor_lr", 0.0, "--actor-lr must be positive (got 0.0)"),
    ("critic_lr", -1e-3, "--critic-lr must be positive (got -0.001)"),
    ("alpha_lr", float("nan"), "--alpha-lr must be positive (got nan)"),
    ("learning_rate", -1.0, "--learning-rate must be positive (got -1.0)"),
    ("discount", 1.0, "--discount must be in (0, 1) (got 1.0)"),
    ("discount", 0.0, "--discount must be in (0, 1) (got 0.0)"),
    ("tau", 0.0, "--tau must be in (0, 1] (got 0.0)"),
    ("tau", 1.5, "--tau must be in (0, 1] (got 1.5)"),
    ("batch_size", 0, "--batch-size must be positive (got 0)"),
    ("num_envs", 0, "--num-envs must be positive (got 0)"),
    ("width", -4, "--width must be positive (got -4)"),
    ("depth", 6, "--depth must be a positive multiple of 4 (got 6)"),
    ("scan_unroll", 0, "--scan-unroll must be positive (got 0)"),
    ("num_epochs", 0, "--num-epochs must be positive (got 0)"),
    ("eval_every", 0, "--eval-every must be positive (got 0)"),
    ("her_ratio", -0.1, "--her-ratio must be in [0, 1] (got -0.1)"),
    ("policy_delay", 0, "--policy-delay must be positive (got 0)"),
    ("logsumexp_coef", -0.1, "--logsumexp-coef must be non-negative (got -0.1)"),
    ("target_noise", -0.2, "--target-noise must be non-negative (got -0.2)"),
    ({"replay_size": 10, "min_replay_size": 20}, None, "--min-replay-size 20 exceeds --replay-size 10"),
    ({"unroll_length": 100, "episode_length": 50}, None, "--unroll-length 100 exceeds --episode-length 50"),
    ({"batch_size": 4096, "num_envs": 2, "min_replay_size": 100}, None, "larger than the buffer holds"),
]
CASES = [
    (name, change, value, words)
    for name in SCRIPTS
    for change, value, words in BAD_INPUT
    if all(
        f in {f.name for f in dataclasses.fields(module(name).Args)}
        for f in ([change] if isinstance(change, str) else change)
    )
]


@pytest.mark.parametrize("name, change, value, words", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_one_line_naming_the_flag(name, change, value, words, tmp_path):
    changes = {change: value} if isinstance(change, str) else change
    with pytest.raises(SystemExit) as stop:
        check(name, dataclasses.replace(base_args(name, tmp_path), **changes))
    message = str(stop.value.code)
    assert message.startswith("error: ") and words in message and "\n" not in message


def test_every_script_has_the_table_rows_it_should():
    covered = {(c[0], c[1] if isinstance(c[1], str) else next(iter(c[1]))) for c in CASES}
    for name in SCRIPTS:
        assert (name, "batch_size") in covered and (name, "depth") in covered and (name, "scan_unroll") in covered
    assert {("sac_her", "tau"), ("td3_her", "tau"), ("crl_deep", "alpha_lr"), ("offline_crl", "actor_lr")} <= covered
    assert {("crl_deep", "replay_size"), ("gcbc", "unroll_length"), ("sac_her", "batch_size")} <= covered


@pytest.mark.parametrize("name", SCRIPTS)
def test_default_args_pass(name, tmp_path):
    check(name, base_args(name, tmp_path))


# ---------------------------------------------------------------------------------------------------
# Non-finite losses: inject a NaN learning rate after the first epoch's updates
# ---------------------------------------------------------------------------------------------------
TINY = {
    "crl_deep": [
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
        "3",
        "--total-env-steps",
        str(40 + 3 * 2 * 20),
    ],
    "sac_her": [
        "--env",
        "reacher",
        "--depth",
        "4",
        "--width",
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
        "--batch-size",
        "8",
        "--replay-size",
        "50",
        "--min-replay-size",
        "10",
        "--total-env-steps",
        "200",
        "--num-epochs",
        "2",
    ],
}
TINY["td3_her"] = TINY["sac_her"]
TINY["gcbc"] = [*TINY["sac_her"], "--mode", "online"]
STEPS_IN_EPOCH_0 = {"crl_deep": 2 * 4, "sac_her": 4 * 4, "td3_her": 4 * 4, "gcbc": 4 * 4}


def run_with_nan_after(name, steps, flags, monkeypatch):
    """Runs the script in this process with every Adam learning rate turning NaN after `steps` updates."""
    import jax.numpy as jnp
    import optax

    adam = optax.adam
    monkeypatch.setattr(
        optax, "adam", lambda lr, *a, **k: adam(lambda count: jnp.where(count < steps, lr, jnp.nan), *a, **k)
    )
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *flags])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, f"{name}.py"), run_name="__main__")
    return str(stop.value.code)


def assert_stopped_at_epoch_1(name, message, run):
    file = run / "checkpoint.msgpack"
    assert message.startswith("error: non-finite ") and "\n" not in message
    assert message.endswith(f"in epoch 1; stopped, the last good checkpoint is {file} (epoch 0)")
    ckpt = runkit.load_checkpoint(str(run), name)  # intact
    assert ckpt["epoch"] == 0
    import jax

    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(ckpt["params"]))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0] and not (run / "summary.json").exists()
    assert all(math.isfinite(v) for k, v in lines[0].items() if k.startswith("training/"))


def test_crl_deep_stops_at_the_nan_epoch_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    flags = [*TINY["crl_deep"], "--run-dir", str(tmp_path), "--run-name", "nan"]
    message = run_with_nan_after("crl_deep", STEPS_IN_EPOCH_0["crl_deep"], flags, monkeypatch)
    assert "critic_loss" in message
    assert_stopped_at_epoch_1("crl_deep", message, tmp_path / "nan")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sac_her", "td3_her", "gcbc"])
def test_baselines_stop_at_the_nan_epoch_and_keep_the_last_good_checkpoint(name, tmp_path, monkeypatch):
    flags = [*TINY[name], "--run-dir", str(tmp_path), "--run-name", "nan"]
    message = run_with_nan_after(name, STEPS_IN_EPOCH_0[name], flags, monkeypatch)
    assert_stopped_at_epoch_1(name, message, tmp_path / "nan")


@pytest.mark.slow
def test_offline_crl_stops_at_the_nan_epoch_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    terminals = np.zeros(200, np.float32)
    terminals[9::10] = 1.0  # 20 trajectories of 10 rows
    np.savez(
        tmp_path / "d.npz",
        observations=rng.normal(size=(200, 10)).astype(np.float32),
        actions=rng.uniform(-1, 1, (200, 2)).astype(np.float32),
        terminals=terminals,
    )
    flags = [
        "--dataset",
        str(tmp_path / "d.npz"),
        "--env",
        "reacher",
        "--train-steps",
        "6",
        "--eval-every",
        "2",
        "--eval-episodes",
        "2",
        "--eval-episode-length",
        "5",
        "--width",
        "16",
        "--repr-dim",
        "8",
        "--batch-size",
        "8",
        "--run-dir",
        str(tmp_path),
        "--run-name",
        "nan",
    ]
    message = run_with_nan_after("offline_crl", 2, flags, monkeypatch)
    assert_stopped_at_epoch_1("offline_crl", message, tmp_path / "nan")
