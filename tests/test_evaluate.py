"""tools/evaluate.py: a saved run's checkpoint, evaluated again, gives the numbers the run logged."""

import json
import os
import subprocess
import sys

import pytest

from tools import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/test_crl_runs.py's tiny reacher config, 2 epochs (2 training steps each after a 2-unroll prefill)
CRL_TINY = [
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
    "2",
    "--total-env-steps",
    str(80 + 2 * 2 * 40),
    "--seed",
    "3",
]


def _env():
    return dict(os.environ, WANDB_MODE="disabled", JAX_PLATFORMS="cpu")


def train(tmp_path, script, *argv):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, f"{script}.py"), *argv, "--run-dir", str(tmp_path), "--run-name", script],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / script


def last_logged(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [m for m in lines if not m.get("summary")][-1]


def assert_same_as_logged(result, logged):
    evals = {k: v for k, v in logged.items() if k.startswith("eval/")}
    assert len(evals) >= 4
    assert {k: result[k] for k in evals} == pytest.approx(evals, rel=1e-6, abs=1e-6)
    assert result["epoch"] == logged["epoch"] and result["env_steps"] == logged["env_steps"]
    assert result["same_as_run"] is True and result["key"] == "run"


@pytest.fixture(scope="module")
def crl_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("evaluate"), "crl_deep", *CRL_TINY)


def test_cli_repeats_the_runs_last_evaluation_and_renders_its_best_episode(crl_run, tmp_path):
    """One CLI call: the JSON line repeats the run's last logged evaluation, and with --video (where MuJoCo
    has an OpenGL backend) the best evaluated episode is rendered without changing the evaluation."""
    from tools.render import osmesa_available

    render = osmesa_available() or bool(os.environ.get("MUJOCO_GL"))
    out = tmp_path / "r.gif"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.evaluate", str(crl_run), *(["--video", str(out)] if render else [])],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["script"] == "crl_deep" and result["env"] == "reacher" and result["episodes"] == 4
    assert_same_as_logged(result, last_logged(crl_run))
    if not render:
        pytest.skip("evaluation checked; no OpenGL backend for MuJoCo's video (apt-get install libosmesa6)")
    assert out.stat().st_size > 0 and result["video"]["frames"] == 26  # reset + 50 steps, every 2nd rendered
    # the best of the evaluated episodes: at least their mean, at most the episode length
    assert result["eval/episode_success"] <= result["video"]["steps_at_goal"] <= 50


def test_another_key_env_or_episode_count_evaluates_afresh(crl_run):
    logged = last_logged(crl_run)
    result = evaluate.evaluate(str(crl_run), episodes=6, seed=11)
    assert result["episodes"] == 6 and result["key"] == "seed 11" and result["same_as_run"] is False
    assert result["eval/episode_length"] == 50.0  # reacher never terminates: whole episodes
    assert result["eval/episode_dist"] != logged["eval/episode_dist"]  # other resets, other distances
    assert 0 <= result["eval/episode_success"] <= 50


def test_bad_inputs_fail_with_one_line(crl_run, tmp_path):
    assert evaluate.main([str(tmp_path)]) == 2  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"script": "qmap", "args": {}}))
    with pytest.raises(ValueError, match="names script 'qmap'"):
        evaluate.load_policy(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"script": "crl_deep", "args": {}}))
    with pytest.raises(ValueError, match="checkpoint"):  # the script's own loader says what is wrong
        evaluate.load_policy(str(tmp_path))
    with pytest.raises(ValueError, match="observations 31 / actions 8; the run's policy takes 13 / 2"):
        evaluate.evaluate(str(crl_run), env_id="ant")
    with pytest.raises(ValueError, match="unknown env 'nope'"):
        evaluate.evaluate(str(crl_run), env_id="nope")


BASELINE_TINY = [
    "--env",
    "reacher",
    "--depth",
    "4",
    "--width",
    "16",
    "--num-envs",
    "4",
    "--num-eval-envs",
    "4",
    "--episode-length",
    "20",
    "--unroll-length",
    "5",
    "--sgd-steps-per-train-step",
    "2",
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
    "--seed",
    "5",
]


def random_dataset(path, state_dim, action_dim):
    """An OGBench-format dataset of random steps: 4 trajectories of 50."""
    import numpy as np

    rng = np.random.default_rng(0)
    terminals = np.zeros(200, np.float32)
    terminals[49::50] = 1
    np.savez(
        path,
        observations=rng.normal(size=(200, state_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(200, action_dim)).astype(np.float32),
        terminals=terminals,
    )
    return str(path)


OFFLINE_TINY = [
    "--width",
    "32",
    "--repr-dim",
    "16",
    "--batch-size",
    "32",
    "--train-steps",
    "40",
    "--eval-every",
    "20",
    "--seed",
    "2",
]

OGBENCH_ENV = "pointmaze-medium-navigate-v0"
GCBC_OFFLINE = ["--width", "32", "--batch-size", "32", "--train-steps", "40", "--num-epochs", "2", "--seed", "2"]

QRL_OFFLINE_TINY = [
    "--width",
    "32",
    "--latent-dim",
    "16",
    "--batch-size",
    "32",
    "--train-steps",
    "40",
    "--eval-every",
    "20",
    "--seed",
    "2",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, argv",
    [
        ("sac_her", BASELINE_TINY),
        ("td3_her", BASELINE_TINY),
        ("gcbc", ["--mode", "online", *BASELINE_TINY]),
        ("offline_crl", ["--env", "reacher", "--eval-episodes", "3", "--eval-episode-length", "10", *OFFLINE_TINY]),
        (
            "offline_crl",
            [
                "--env",
                "pointmaze-medium-navigate-v0",
                "--eval-episodes",
                "2",
                "--eval-episode-length",
                "20",
                *OFFLINE_TINY,
            ],
        ),  # evaluated by the script's OGBench loop
        (
            "gcbc",
            ["--mode", "offline", "--env", "reacher", "--num-eval-envs", "3", "--episode-length", "10", *GCBC_OFFLINE],
        ),
        (
            "gcbc",
            [
                "--mode",
                "offline",
                "--env",
                OGBENCH_ENV,
                "--num-eval-envs",
                "2",
                "--episode-length",
                "20",
                *GCBC_OFFLINE,
            ],
        ),
        (
            "gcbc",
            [
                "--mode",
                "offline",
                "--no-goal",
                "--env",
                OGBENCH_ENV,
                "--num-eval-envs",
                "2",
                "--episode-length",
                "20",
                *GCBC_OFFLINE,
            ],
        ),
        (
            "qrl",
            [
                "--mode",
                "online",
                "--env",
                "reacher",
                "--depth",
                "4",
                "--width",
                "16",
                "--latent-dim",
                "16",
                "--batch-size",
                "16",
                "--num-envs",
                "4",
                "--num-eval-envs",
                "4",
                "--episode-length",
                "20",
                "--unroll-length",
                "5",
                "--sgd-steps-per-train-step",
                "2",
                "--replay-size",
                "100",
                "--min-replay-size",
                "10",
                "--num-epochs",
                "2",
                "--total-env-steps",
                "120",
                "--seed",
                "5",
            ],
        ),
        (
            "qrl",
            [
                "--mode",
                "offline",
                "--env",
                "reacher",
                "--eval-episodes",
                "3",
                "--eval-episode-length",
                "10",
                *QRL_OFFLINE_TINY,
            ],
        ),
        (
            "qrl",
            [
                "--mode",
                "offline",
                "--env",
                "pointmaze-medium-navigate-v0",
                "--eval-episodes",
                "2",
                "--eval-episode-length",
                "20",
                *QRL_OFFLINE_TINY,
            ],
        ),
    ],
    ids=[
        "sac_her",
        "td3_her",
        "gcbc",
        "offline_crl",
        "offline_crl_ogbench",
        "gcbc_offline",
        "gcbc_offline_ogbench",
        "bc_offline_ogbench",
        "qrl_online",
        "qrl_offline",
        "qrl_offline_ogbench",
    ],
)
def test_every_script_repeats_its_logged_evaluation(tmp_path, script, argv):
    if script == "offline_crl" or "offline" in argv:  # a dataset of random steps
        sizes = (10, 2) if "reacher" in argv else (2, 2)
        argv = ["--dataset", random_dataset(tmp_path / "d.npz", *sizes), *argv]
    run = train(tmp_path, script, *argv)
    result = evaluate.evaluate(str(run))
    assert result["script"] == script
    assert_same_as_logged(result, last_logged(run))


def test_a_no_goal_bc_run_on_ogbench_is_evaluated_as_it_logged_and_ignores_the_goal(tmp_path):
    """gcbc.py --no-goal on an OGBench id: the tool runs the script's OGBench loop with the run's own
    episodes and seed, and rebuilds the policy without goal inputs."""
    import numpy as np

    dataset = random_dataset(tmp_path / "d.npz", 2, 2)
    argv = ["--mode", "offline", "--no-goal", "--env", OGBENCH_ENV, "--dataset", dataset, *GCBC_OFFLINE]
    run = train(tmp_path, "gcbc", *argv, "--num-eval-envs", "2", "--episode-length", "15")
    result = evaluate.evaluate(str(run))
    assert result["script"] == "gcbc" and result["env"] == OGBENCH_ENV and result["episodes"] == 2
    assert_same_as_logged(result, last_logged(run))
    assert result["eval/episode_length"] == 15.0  # the run's episode cap, not the env's 1000
    policy = evaluate.load_policy(str(run))
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(8, 2)).astype(np.float32)
    actions = [np.asarray(policy(np.concatenate([obs, rng.normal(size=(8, 2)) * s], -1))) for s in (0.0, 50.0)]
    np.testing.assert_array_equal(actions[0], actions[1])
    assert np.abs(actions[0]).max() > 0  # a real policy output, not a constant
