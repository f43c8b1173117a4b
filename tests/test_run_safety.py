"""Trustworthy runs, for every script: input validated before anything compiles, checkpoints in flax
msgpack behind a JSON header with one-line errors for bad files, --resume checked against the run, and a
non-finite loss stopping the run at its epoch with the last good checkpoint intact."""

import dataclasses
import importlib
import json
import math
import os
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pytest

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
# Checkpoint files
# ---------------------------------------------------------------------------------------------------
def write_checkpoint(name, run, args=None, epoch=3):
    m = module(name)
    args = args or m.Args(env="reacher", depth=8, width=16)
    state = {
        "params": {"actor": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}},
        "opt": (np.zeros(2, np.float32), {"count": np.asarray(5, np.int32)}),
        "key": np.asarray([1, 2], np.uint32),
    }
    m.save_checkpoint(str(run), args, state, epoch, 1000, 12.5)
    return state


def error_of(fn, *a):
    with pytest.raises(SystemExit) as stop:
        fn(*a)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


@pytest.mark.parametrize("name", SCRIPTS)
def test_checkpoint_round_trip_and_header(name, tmp_path):
    state = write_checkpoint(name, tmp_path)
    m = module(name)
    with open(tmp_path / "checkpoint.msgpack", "rb") as f:
        header = json.loads(f.readline())
    assert header["script"] == name and header["version"] == 1 and header["env"] == "reacher"
    assert header["depths"]["depth"] == 8 and header["widths"]["width"] == 16 and header["epoch"] == 3
    ckpt = m.load_checkpoint(str(tmp_path))
    assert ckpt["epoch"] == 3 and ckpt["env_steps"] == 1000 and ckpt["args"]["depth"] == 8
    np.testing.assert_array_equal(ckpt["params"]["actor"]["w"], state["params"]["actor"]["w"])
    restored = m.restore_state(state, ckpt["state"], str(tmp_path))
    np.testing.assert_array_equal(restored["opt"][1]["count"], 5)
    assert isinstance(restored["opt"], tuple) and not list(tmp_path.glob("*.tmp"))


def test_bad_checkpoint_files_are_one_line_naming_the_file(tmp_path):
    import crl_deep as C

    file = tmp_path / "checkpoint.msgpack"
    write_checkpoint("crl_deep", tmp_path)
    good = file.read_bytes()
    file.write_bytes(good[:-100])
    payload = len(good) - good.index(b"\n") - 1
    assert (
        error_of(C.load_checkpoint, str(tmp_path))
        == f"error: {file}: truncated ({payload - 100} of {payload} payload bytes)"
    )
    file.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert "corrupted" in error_of(C.load_checkpoint, str(tmp_path))
    file.write_bytes(b"\x00garbage\n" * 10)
    assert error_of(C.load_checkpoint, str(file)).startswith(f"error: {file}: not a checkpoint.msgpack")
    file.write_bytes(pickle.dumps({"params": {}}, protocol=4))
    assert "old-format (pickle)" in error_of(C.load_checkpoint, str(file))
    file.unlink()
    (tmp_path / "checkpoint.pkl").write_bytes(pickle.dumps({"params": {}}))
    assert "checkpoint.pkl: an old-format (pickle) checkpoint" in error_of(C.load_checkpoint, str(tmp_path))
    write_checkpoint("sac_her", tmp_path)
    assert error_of(C.load_checkpoint, str(tmp_path)) == f"error: {file}: written by sac_her.py, not by crl_deep.py"
    header, _, payload = file.read_bytes().partition(b"\n")
    file.write_bytes(json.dumps({**json.loads(header), "version": 0}).encode() + b"\n" + payload)
    assert "checkpoint format version 0" in error_of(module("sac_her").load_checkpoint, str(tmp_path))


def test_restore_into_another_configuration_is_one_line(tmp_path):
    import crl_deep as C

    state = write_checkpoint("crl_deep", tmp_path)
    ckpt = C.load_checkpoint(str(tmp_path))
    wider = {**state, "params": {"actor": {"w": np.zeros((2, 4), np.float32)}}}
    assert "shapes do not fit" in error_of(C.restore_state, wider, ckpt["state"], str(tmp_path))
    other = {**state, "params": {"critic": {"w": state["params"]["actor"]["w"]}}}
    assert "does not fit this configuration" in error_of(C.restore_state, other, ckpt["state"], str(tmp_path))


def test_resume_keeps_the_runs_settings_and_lists_harmless_changes(tmp_path, capsys):
    import crl_deep as C

    write_checkpoint("crl_deep", tmp_path, C.Args(env="reacher", depth=8, width=16, seed=4))
    args = C.parse_args(["--resume", str(tmp_path)])
    assert (args.env, args.depth, args.width, args.seed, args.resume) == ("reacher", 8, 16, 4, str(tmp_path))
    args = C.parse_args(["--resume", str(tmp_path), "--track", "--depth", "8", "--wandb-project", "p"])
    assert args.track and args.wandb_project == "p" and args.depth == 8
    assert capsys.readouterr().err.strip() == "resume: --track True (was False), --wandb-project 'p' (was 'crl_deep')"
    message = error_of(C.parse_args, ["--resume", str(tmp_path), "--depth", "16", "--env", "ant"])
    assert "--depth 16 (the run has 8)" in message and "--env 'ant' (the run has 'reacher')" in message
    assert "--seed 5" in error_of(C.parse_args, ["--resume", str(tmp_path), "--seed=5"])
    assert "no checkpoint there" in error_of(C.parse_args, ["--resume", str(tmp_path / "nothing")])


def test_a_bad_checkpoint_stops_resume_before_any_compile(tmp_path):
    import crl_deep as C

    write_checkpoint("crl_deep", tmp_path, C.Args(env="reacher", depth=4, width=8))
    file = tmp_path / "checkpoint.msgpack"
    file.write_bytes(file.read_bytes()[:-10])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "crl_deep.py"), "--resume", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {file}: truncated ({proc.stderr.split('(')[1].split(')')[0]})"]


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
    ckpt = module(name).load_checkpoint(str(run))  # intact
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


def test_sigkill_during_checkpoint_writes_never_leaves_a_partial_checkpoint(tmp_path):
    """A child rewrites a ~24 MB checkpoint in a loop; SIGKILLed at random moments, the checkpoint it
    leaves always loads whole (a stale checkpoint.msgpack.tmp may remain; it is never read)."""
    import random
    import signal
    import time

    child = f"""
import sys, numpy as np
sys.path.insert(0, {ROOT!r})
import crl_deep as C
args = C.Args(env="reacher")
state = {{"params": {{"w": np.zeros((3_000_000,), np.float32)}}}}
for epoch in range(10**6):
    state["params"]["w"][:] = epoch
    C.save_checkpoint({str(tmp_path)!r}, args, state, epoch, epoch, 0.0)
    print(epoch, flush=True)
"""
    rng = random.Random(0)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    import crl_deep as C

    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "0"  # one whole checkpoint exists
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = C.load_checkpoint(str(tmp_path))
        assert np.all(ckpt["params"]["w"] == ckpt["epoch"])
    assert {p.name for p in tmp_path.iterdir()} <= {"checkpoint.msgpack", "checkpoint.msgpack.tmp"}


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
