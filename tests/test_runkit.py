"""runkit, the host package every script imports, tested once: checkpoints (format, bad files, kills), resume
flags, RunLog (metrics, per-seed wandb runs, the in-epoch progress bar), one line on Ctrl-C and on a full
disk with nothing half-written, and the tools runnable as `python tools/<name>.py`."""

import errno
import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crl_deep
import runkit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def error_of(fn, *a):
    with pytest.raises(SystemExit) as stop:
        fn(*a)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def write_checkpoint(run, script="crl_deep", args=None, epoch=3):
    args = args or crl_deep.Args(env="reacher", depth=8, width=16)
    state = {
        "params": {"actor": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}},
        "opt": (np.zeros(2, np.float32), {"count": np.asarray(5, np.int32)}),
        "key": np.asarray([1, 2], np.uint32),
    }
    runkit.save_checkpoint(str(run), script, args, state, epoch, 1000, 12.5)
    return state


# ---- checkpoints ------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_header(tmp_path):
    state = write_checkpoint(tmp_path)
    with open(tmp_path / "checkpoint.msgpack", "rb") as f:
        header = json.loads(f.readline())
    assert header["format"] == "deep-crl checkpoint" and header["version"] == 1 and header["script"] == "crl_deep"
    assert header["env"] == "reacher" and header["depths"]["depth"] == 8 and header["widths"]["width"] == 16
    ckpt = runkit.load_checkpoint(str(tmp_path), "crl_deep")
    assert ckpt["epoch"] == 3 and ckpt["env_steps"] == 1000 and ckpt["wall_time"] == 12.5 and ckpt["args"]["depth"] == 8
    np.testing.assert_array_equal(ckpt["params"]["actor"]["w"], state["params"]["actor"]["w"])
    restored = runkit.restore_state(state, ckpt["state"], str(tmp_path))
    np.testing.assert_array_equal(restored["opt"][1]["count"], 5)
    assert isinstance(restored["opt"], tuple) and not list(tmp_path.glob("*.tmp"))


def test_bad_checkpoint_files_are_one_line_naming_the_file(tmp_path):
    load = lambda path: runkit.load_checkpoint(path, "crl_deep")
    file = tmp_path / "checkpoint.msgpack"
    write_checkpoint(tmp_path)
    good = file.read_bytes()
    file.write_bytes(good[:-100])
    payload = len(good) - good.index(b"\n") - 1
    assert error_of(load, str(tmp_path)) == f"error: {file}: truncated ({payload - 100} of {payload} payload bytes)"
    file.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert "corrupted" in error_of(load, str(tmp_path))
    file.write_bytes(b"\x00garbage\n" * 10)
    assert error_of(load, str(file)).startswith(f"error: {file}: not a checkpoint.msgpack")
    file.write_bytes(pickle.dumps({"params": {}}, protocol=4))
    assert "old-format (pickle)" in error_of(load, str(file))
    file.unlink()
    (tmp_path / "checkpoint.pkl").write_bytes(pickle.dumps({"params": {}}))
    assert "checkpoint.pkl: an old-format (pickle) checkpoint" in error_of(load, str(tmp_path))
    write_checkpoint(tmp_path, "sac_her")
    assert error_of(load, str(tmp_path)) == f"error: {file}: written by sac_her.py, not by crl_deep.py"
    header, _, payload = file.read_bytes().partition(b"\n")
    file.write_bytes(json.dumps({**json.loads(header), "version": 0}).encode() + b"\n" + payload)
    assert "checkpoint format version 0" in error_of(runkit.load_checkpoint, str(tmp_path), "sac_her")
    assert "no checkpoint there" in error_of(load, str(tmp_path / "nothing"))


def test_restore_into_another_configuration_is_one_line(tmp_path):
    state = write_checkpoint(tmp_path)
    ckpt = runkit.load_checkpoint(str(tmp_path), "crl_deep")
    wider = {**state, "params": {"actor": {"w": np.zeros((2, 4), np.float32)}}}
    assert "shapes do not fit" in error_of(runkit.restore_state, wider, ckpt["state"], str(tmp_path))
    other = {**state, "params": {"critic": {"w": state["params"]["actor"]["w"]}}}
    assert "does not fit this configuration" in error_of(runkit.restore_state, other, ckpt["state"], str(tmp_path))


def test_resume_keeps_the_runs_settings_and_lists_harmless_changes(tmp_path, capsys):
    parse = lambda argv: runkit.parse_args(crl_deep.Args, "crl_deep", argv)
    write_checkpoint(tmp_path, args=crl_deep.Args(env="reacher", depth=8, width=16, seed=4))
    args = parse(["--resume", str(tmp_path)])
    assert (args.env, args.depth, args.width, args.seed, args.resume) == ("reacher", 8, 16, 4, str(tmp_path))
    args = parse(["--resume", str(tmp_path), "--track", "--depth", "8", "--wandb-project", "p"])
    assert args.track and args.wandb_project == "p" and args.depth == 8
    assert capsys.readouterr().err.strip() == "resume: --track True (was False), --wandb-project 'p' (was 'crl_deep')"
    message = error_of(parse, ["--resume", str(tmp_path), "--depth", "16", "--env", "ant"])
    assert "--depth 16 (the run has 8)" in message and "--env 'ant' (the run has 'reacher')" in message
    assert "--seed 5" in error_of(parse, ["--resume", str(tmp_path), "--seed=5"])


def test_a_bad_checkpoint_stops_resume_before_any_compile(tmp_path):
    write_checkpoint(tmp_path, args=crl_deep.Args(env="reacher", depth=4, width=8))
    file = tmp_path / "checkpoint.msgpack"
    file.write_bytes(file.read_bytes()[:-10])
    cmd = [sys.executable, os.path.join(ROOT, "crl_deep.py"), "--resume", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {file}: truncated ({proc.stderr.split('(')[1].split(')')[0]})"]


def test_sigkill_during_checkpoint_writes_never_leaves_a_partial_checkpoint(tmp_path):
    """A child rewrites a ~12 MB checkpoint in a loop; SIGKILLed at random moments, the checkpoint it
    leaves always loads whole (a stale checkpoint.msgpack.tmp may remain; it is never read)."""
    import random

    child = f"""
import sys, numpy as np
sys.path.insert(0, {ROOT!r})
import crl_deep, runkit
args = crl_deep.Args(env="reacher")
state = {{"params": {{"w": np.zeros((3_000_000,), np.float32)}}}}
for epoch in range(10**6):
    state["params"]["w"][:] = epoch
    runkit.save_checkpoint({str(tmp_path)!r}, "crl_deep", args, state, epoch, epoch, 0.0)
    print(epoch, flush=True)
"""
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", child], env=ENV, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "0"  # one whole checkpoint exists
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = runkit.load_checkpoint(str(tmp_path), "crl_deep")
        assert np.all(ckpt["params"]["w"] == ckpt["epoch"])
    assert {p.name for p in tmp_path.iterdir()} <= {"checkpoint.msgpack", "checkpoint.msgpack.tmp"}


# ---- a full disk, Ctrl-C ----------------------------------------------------------------------------
def test_a_full_disk_is_one_line_leaves_no_temp_file_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, epoch=3)
    before = (tmp_path / "checkpoint.msgpack").read_bytes()
    real_fsync = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    message = error_of(write_checkpoint, tmp_path, "crl_deep", None, 4)
    file = tmp_path / "checkpoint.msgpack"
    assert message == f"error: cannot write {file}: No space left on device (the previous one is intact)"
    assert not list(tmp_path.glob("*.tmp")) and file.read_bytes() == before
    assert runkit.load_checkpoint(str(tmp_path), "crl_deep")["epoch"] == 3
    message = error_of(runkit.write_atomic, str(tmp_path / "new.json"), b"{}")
    assert message.endswith("(nothing was written)") and not list(tmp_path.glob("new.json*"))


CHILD = f"""
import errno, os, sys, time
sys.path.insert(0, {ROOT!r})
import crl_deep, runkit
args = crl_deep.Args(env="reacher", run_dir=sys.argv[1], run_name="run")
path = runkit.open_run(args, "crl_deep")
if sys.argv[2] != "none":
    runkit.save_checkpoint(path, "crl_deep", args, {{"params": {{}}}}, 2, 10, 0.0)
print("ready", flush=True)
if sys.argv[3] == "full":  # a raw OSError from any write of the run, e.g. appending to metrics.jsonl
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(path, "metrics.jsonl"))
time.sleep(60)
"""


@pytest.mark.parametrize("checkpointed", [True, False])
def test_ctrl_c_is_one_line_naming_the_last_checkpoint_and_the_resume_command(tmp_path, checkpointed):
    cmd = [sys.executable, "-c", CHILD, str(tmp_path), "yes" if checkpointed else "none", "sleep"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    run = tmp_path / "run"
    expected = (
        f"interrupted; the last checkpoint is epoch 2: resume with python crl_deep.py --resume {run}"
        if checkpointed
        else f"interrupted; no checkpoint yet: nothing to resume in {run}"
    )
    assert err.splitlines() == [expected] and proc.returncode == -signal.SIGINT


def test_a_full_disk_anywhere_in_a_run_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), "yes", "full"], env=ENV, capture_output=True, text=True
    )
    run = tmp_path / "run"
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"error: No space left on device: {run / 'metrics.jsonl'}; the last checkpoint is epoch 2: "
        f"resume with python crl_deep.py --resume {run}"
    ]


# ---- RunLog -----------------------------------------------------------------------------------------
def test_runlog_one_wandb_run_per_seed_in_one_group(tmp_path, monkeypatch):
    """A run per seed (own id, name, config seed, one group), each seed's records logged to its own run, each
    run's summary its seed's; the summary line has their mean and std."""
    runs = []

    class FakeRun:
        def __init__(self, **kwargs):
            self.init, self.logged, self.summary, self.finished = kwargs, [], {}, False
            runs.append(self)

        def log(self, record, step):
            self.logged.append((step, record))

        def finish(self):
            self.finished = True

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: FakeRun(**kw)))
    args = crl_deep.Args(seed=7, num_seeds=2, track=True, wandb_project="p")
    (tmp_path / "grid_cell").mkdir()
    log = runkit.RunLog(args, "crl_deep", str(tmp_path / "grid_cell"), 0, 2)
    for epoch in log.epochs:
        log.log([{"epoch": epoch, "seed": s, "sps": 1.0, "eval/x": 10.0 * s + epoch} for s in (7, 8)], 100, "eval/x")
    summary = log.finish(100)
    assert [r.init["id"] for r in runs] == ["grid_cell__s7", "grid_cell__s8"]
    assert all(r.init["group"] == "grid_cell" and r.init["reinit"] == "create_new" for r in runs)
    assert [r.init["config"]["seed"] for r in runs] == [7, 8] and runs[0].init["config"]["num_seeds"] == 2
    assert [[rec["seed"] for _, rec in r.logged] for r in runs] == [[7, 7], [8, 8]]
    assert [r.summary["eval/x_last5"] for r in runs] == [70.5, 80.5] and all(r.finished for r in runs)
    assert summary["eval/x_last5"] == 75.5 and summary["eval/x_last5_std"] == 5.0
    assert summary["seeds"] == {"7": {"eval/x_last5": 70.5}, "8": {"eval/x_last5": 80.5}}
    lines = (tmp_path / "grid_cell" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1]) == summary


def test_runlog_records_stops_on_a_nan_and_resumes_dropping_later_lines(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    args = crl_deep.Args(env="reacher")
    log = runkit.RunLog(args, "crl_deep", str(run), 0, 3, start_time=time.time() - 5.0, compile_seconds=2.5)
    records = []
    for epoch in log.epochs:
        record = log.record(epoch, 100 * (epoch + 1), 0.5, 100, {"critic_loss": 1.0}, {"episode_success": 2.0})
        records.append(record)
        log.log(record, record["env_steps"], "eval/episode_success")
        log.checkpoint({"params": {}}, epoch, record["env_steps"], record["wall_time"])
    assert list(records[0]) == ["epoch", "env_steps", "wall_time", "sps", "epoch_seconds", "compile_seconds"] + [
        "training/critic_loss",
        "eval/episode_success",
    ]
    assert records[0]["sps"] == 200.0 and records[0]["wall_time"] >= 5.0 and "compile_seconds" not in records[1]
    message = error_of(log.check_finite, {"critic_loss": float("nan"), "alpha": 1.0}, 3)
    last_good = f"the last good checkpoint is {run}/checkpoint.msgpack (epoch 2)"
    assert message == f"error: non-finite critic_loss in epoch 3; stopped, {last_good}"
    resumed = runkit.RunLog(crl_deep.Args(env="reacher", resume=str(run)), "crl_deep", str(run), 2, 3)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert len(resumed.eval_history[None]) == 2
    resumed.finish(0)


def test_the_progress_bar_moves_inside_a_jitted_scan(tmp_path, monkeypatch):
    monkeypatch.setitem(runkit.devices.PROGRESS, "in_epoch", True)  # as after estimate_epoch of a long epoch
    (tmp_path / "r").mkdir()
    log = runkit.RunLog(crl_deep.Args(env="reacher"), "crl_deep", str(tmp_path / "r"), 0, 2, steps_per_epoch=5)
    seen = []

    def scan_body(carry, step):
        runkit.progress(step)
        jax.debug.callback(lambda: seen.append(log.bar.n))
        return carry + 1, None

    epoch = jax.jit(lambda c: jax.lax.scan(scan_body, c, jnp.arange(5))[0])
    for _ in log.epochs:
        jax.block_until_ready(epoch(jnp.zeros(())))
        jax.effects_barrier()
    assert log.bar.n == 10 and max(seen) >= 9 and min(seen) <= 1  # it advanced inside each epoch
    log.finish(0)


def test_device_peak_memory_reports_the_largest_peak_where_the_backend_counts_it():
    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    gpu = [Device({"peak_bytes_in_use": 5, "bytes_in_use": 1}), Device({"peak_bytes_in_use": 7})]
    assert runkit.device_peak_memory(gpu) == {"device_peak_bytes": 7}
    assert runkit.device_peak_memory([Device(None)]) == {}  # jax's CPU devices: no stats, no field
    if jax.default_backend() == "cpu":
        assert runkit.device_peak_memory(jax.devices()) == {}


# ---- the tools as scripts ---------------------------------------------------------------------------
def test_tools_run_as_python_tools_name_from_any_folder(tmp_path):
    with_main = [
        f for f in sorted(glob.glob(os.path.join(ROOT, "tools", "*.py"))) if '__name__ == "__main__"' in open(f).read()
    ]
    shim = "sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))"
    assert len(with_main) >= 10 and all(shim in open(f).read() for f in with_main)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--help"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: evaluate.py")


def test_a_long_first_epoch_is_announced_in_one_line_with_how_it_was_estimated(monkeypatch, capsys):
    from runkit import devices

    monkeypatch.setitem(runkit.devices.PROGRESS, "in_epoch", True)
    assert runkit.estimate_epoch("crl_deep", 5e11, 256, 256) is None  # not probed
    # a short epoch traces no progress callback, so jax's persistent compilation cache can store it
    assert runkit.devices.PROGRESS == {"in_epoch": False}
    seen = []
    monkeypatch.setattr(jax.debug, "callback", lambda *a: seen.append(a))
    runkit.progress(jnp.zeros((), jnp.int32))
    assert seen == []
    monkeypatch.setattr(devices, "matmul_rate", lambda batch, width: 1e11)
    assert runkit.estimate_epoch("crl_deep", 4.5e12, 256, 256) == pytest.approx(100.0)  # 4.5e12 / (0.45 * 1e11)
    assert runkit.devices.PROGRESS == {"in_epoch": True}
    runkit.progress(jnp.zeros((), jnp.int32))
    assert len(seen) == 1
    assert capsys.readouterr().err == ""  # under 10 minutes: nothing said
    assert runkit.estimate_epoch("crl_deep", 3.24e16, 512, 1024) == pytest.approx(720_000.0)
    line = capsys.readouterr().err.strip()
    assert line.startswith("crl_deep: the first epoch will take about 200.0 h: 3.2e+16 dense FLOPs of SGD steps")
    assert "45% (a step's share) of the 100 GFLOP/s a [512, 1024] matmul chain reaches here" in line
    assert line.endswith("; these settings are meant for a GPU") == (jax.default_backend() == "cpu")


def test_the_matmul_probe_measures_a_plausible_rate():
    rate = runkit.devices.matmul_rate(64, 64, layers=4)
    assert 1e8 < rate < 1e16
