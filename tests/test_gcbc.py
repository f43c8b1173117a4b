"""gcbc.py: hindsight goals inside one trajectory, the likelihood loss by hand, offline/online runs, and a
learning check: offline GCBC imitates a scripted reacher demonstrator."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gcbc
import runkit
from envs import ogbench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_goal_offsets_uniform_and_geometric_match_their_distributions():
    n = 40000
    horizon = jnp.full((n,), 4)
    k = np.asarray(gcbc.sample_goal_offsets(jax.random.PRNGKey(0), horizon, "uniform_future", 0.99))
    np.testing.assert_allclose(np.bincount(k, minlength=5)[1:] / n, [0.25] * 4, atol=0.01)
    k = np.asarray(gcbc.sample_goal_offsets(jax.random.PRNGKey(1), horizon, "geometric_future", 0.5))
    expect = np.array([0.5, 0.25, 0.125, 0.0625]) / 0.9375  # P(k) ~ 0.5^k, k = 1..4
    np.testing.assert_allclose(np.bincount(k, minlength=5)[1:] / n, expect, atol=0.01)
    zero = gcbc.sample_goal_offsets(jax.random.PRNGKey(2), jnp.array([0, 1, 0]), "geometric_future", 0.9)
    np.testing.assert_array_equal(np.asarray(zero), [0, 1, 0])


def write_dataset(path, lengths, state_dim=10, action_size=2):
    """Trajectories of the given lengths; state[0] = row index, state[1] = trajectory index."""
    rows = sum(lengths)
    obs = np.zeros((rows, state_dim), np.float32)
    obs[:, 0] = np.arange(rows)
    obs[:, 1] = np.repeat(np.arange(len(lengths)), lengths)
    terminals = np.zeros(rows, np.float32)
    terminals[np.cumsum(lengths) - 1] = 1
    actions = np.stack([np.arange(rows) / rows, -np.arange(rows) / rows], 1).astype(np.float32)[:, :action_size]
    np.savez(path, observations=obs, actions=actions, terminals=terminals)
    return obs, terminals


def device_data(dataset):
    anchor_rows = np.flatnonzero(dataset["traj_end"] > np.arange(len(dataset["traj_end"])))
    return {
        "observations": jnp.asarray(dataset["observations"]),
        "actions": jnp.asarray(dataset["actions"]),
        "traj_end": jnp.asarray(dataset["traj_end"]),
        "anchor_rows": jnp.asarray(anchor_rows, jnp.int32),
    }


@pytest.mark.parametrize("goal_sampling", ["uniform_future", "geometric_future"])
def test_offline_goals_are_later_rows_of_the_same_trajectory(tmp_path, goal_sampling):
    # lengths 3, 1 (a lone terminal row: never an anchor), 5, then 2 rows of an unfinished trajectory (dropped)
    obs, _ = write_dataset(tmp_path / "d.npz", [3, 1, 5, 2])
    terminals = np.load(tmp_path / "d.npz")["terminals"]
    terminals[-1] = 0
    np.savez(tmp_path / "d.npz", observations=obs, actions=np.zeros((11, 2), np.float32), terminals=terminals)
    dataset = gcbc.load_dataset(str(tmp_path / "d.npz"), 10, 2)
    assert len(dataset["observations"]) == 9
    np.testing.assert_array_equal(dataset["traj_end"], [2, 2, 2, 3, 8, 8, 8, 8, 8])
    # goal_indices (0, 1): the goal is (row, trajectory) of the goal row
    batch = gcbc.sample_offline_batch(device_data(dataset), jax.random.PRNGKey(0), 3000, (0, 1), goal_sampling, 0.7)
    row, traj = np.asarray(batch["state"][:, 0]).astype(int), np.asarray(batch["state"][:, 1])
    goal_row, goal_traj = np.asarray(batch["goal"][:, 0]).astype(int), np.asarray(batch["goal"][:, 1])
    assert set(row) == {0, 1, 4, 5, 6, 7}  # every row that has a later row in its trajectory, nothing else
    assert np.all(goal_traj == traj) and np.all(goal_row > row) and np.all(goal_row <= dataset["traj_end"][row])
    assert set(goal_row[row == 4]) == {5, 6, 7, 8}
    if goal_sampling == "geometric_future":  # nearer goals are likelier: P(k=1) / P(k=2) = 1 / 0.7
        k = goal_row[row == 4] - 4
        assert np.mean(k == 1) > np.mean(k == 2) > np.mean(k == 4)


def test_load_dataset_rejects_bad_files_with_one_line(tmp_path):
    write_dataset(tmp_path / "ok.npz", [3, 4])
    with pytest.raises(ValueError, match="states of 11"):
        gcbc.load_dataset(str(tmp_path / "ok.npz"), 11, 2)
    np.savez(tmp_path / "bad.npz", observations=np.zeros((4, 10)), actions=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['terminals'\]"):
        gcbc.load_dataset(str(tmp_path / "bad.npz"), 10, 2)
    np.savez(tmp_path / "noterm.npz", observations=np.zeros((4, 10)), actions=np.zeros((4, 2)), terminals=np.zeros(4))
    with pytest.raises(ValueError, match="no complete trajectory"):
        gcbc.load_dataset(str(tmp_path / "noterm.npz"), 10, 2)


def test_online_goals_stay_inside_the_episode_across_early_resets():
    # one env, capacity 8, full, oldest at slot 5; episode ids in time order: 0 0 | 1 1 1 | 2 | 3 3
    ids = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    buf = {k: np.array(v) for k, v in gcbc.buffer_init(8, 1, 2, 1).items()}
    slots = (5 + np.arange(8)) % 8
    buf["state"][slots, 0, 0] = np.arange(8)
    buf["traj_id"][slots, 0] = ids
    buf["insert_pos"], buf["size"] = np.int32(5), np.int32(8)
    buf = jax.tree_util.tree_map(jnp.asarray, buf)
    batch = gcbc.sample_online_batch(buf, jax.random.PRNGKey(0), 4000, (0,), "uniform_future", 0.99)
    pos, goal, valid = (np.asarray(batch[k]).reshape(4000, -1)[:, 0] for k in ("state", "goal", "valid"))
    pos, goal = pos.astype(int), goal.astype(int)
    last = np.array([1, 1, 4, 4, 4, 5, 7, 7])
    np.testing.assert_array_equal(valid, (last[pos] > pos).astype(np.float32))
    ok = valid > 0
    assert np.all(ids[goal[ok]] == ids[pos[ok]]) and np.all(goal[ok] > pos[ok])
    assert set(goal[pos == 2]) == {3, 4}


def test_bc_loss_is_the_gaussian_negative_log_likelihood_of_valid_rows():
    policy = gcbc.build_networks(gcbc.Args(width=8, depth=4), 2)
    params = policy.init(jax.random.PRNGKey(0), jnp.zeros((1, 7)))
    rng = np.random.default_rng(0)
    batch = {
        "state": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "goal": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32),
        "action": jnp.asarray(rng.uniform(-1, 1, (3, 2)), jnp.float32),
        "valid": jnp.array([1.0, 1.0, 0.0]),
    }
    loss, _ = gcbc.bc_loss_fn(params, policy, batch)
    mean, log_std = (np.asarray(x) for x in policy.apply(params, jnp.concatenate([batch["state"], batch["goal"]], -1)))
    std = np.exp(log_std)
    nll = -np.sum(-0.5 * ((np.asarray(batch["action"]) - mean) / std) ** 2 - np.log(std * np.sqrt(2 * np.pi)), -1)
    np.testing.assert_allclose(float(loss), nll[:2].mean(), rtol=1e-5)
    assert np.all(np.abs(mean) <= 1.0) and np.all((log_std >= -5) & (log_std <= 2))


def run_script(*flags, check=True, full_optimization=False):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"), "WANDB_MODE": "disabled"}
    if full_optimization:  # a compute-bound learning run: drop conftest's fast-compile XLA level
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "gcbc.py"), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bad_input_fails_early_with_one_line(tmp_path):
    proc = run_script("--mode", "offline", "--env", "reacher", check=False)
    assert (
        proc.returncode == 1
        and proc.stderr.strip().splitlines()[-1] == "error: --mode offline needs --dataset PATH.npz"
    )
    with pytest.raises(SystemExit) as stop:  # the other checks, in-process (no interpreter start)
        gcbc.check_args(gcbc.Args(mode="online", env="reacher", dataset=str(tmp_path / "x.npz")), ("reacher",), 1)
    assert str(stop.value.code).startswith("error: ") and "\n" not in str(stop.value.code)
    # a missing file passes check_args (tools/grid.py vets sweeps whose data lies elsewhere), the run stops on it
    missing = str(tmp_path / "missing.npz")
    gcbc.check_args(gcbc.Args(mode="offline", env="reacher", dataset=missing), ("reacher",), 1)
    proc = run_script(
        "--mode", "offline", "--env", "reacher", "--dataset", missing, "--run-dir", str(tmp_path), check=False
    )
    assert (
        proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == f"error: --dataset {missing!r} does not exist"
    )
    assert sorted(os.listdir(tmp_path)) == []  # nothing written


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(mode="online", no_goal=True, dataset=""),
            "--no-goal (plain behaviour cloning of a dataset) needs --mode offline",
        ),
        (dict(env="antmaze-nope-navigate-v0"), "unknown env 'antmaze-nope-navigate-v0': neither one of our envs/ ids"),
        (dict(env="antmaze-medium-navigate-singletask-v0"), "nor a goal-conditioned OGBench dataset id"),
        (dict(env="antmaze-medium-stitch-v0", eval_env="reacher"), "--eval-env is for our envs/ ids"),
        (dict(env="antmaze-medium-stitch-v0", width=0), "--width must be positive (got 0)"),
        (dict(mode="online", env="antmaze-medium-stitch-v0", dataset=""), "unknown env 'antmaze-medium-stitch-v0'"),
    ],
)
def test_bad_ogbench_and_no_goal_flags_fail_with_one_line(change, message):
    args = gcbc.Args(**{"mode": "offline", "env": "reacher", "dataset": "d.npz", **change})
    with pytest.raises(SystemExit) as stop:
        gcbc.check_args(args, ("reacher",), 1)
    code = str(stop.value.code)
    assert code.startswith("error: ") and message in code and "\n" not in code


def test_defaults_are_ogbenchs_gcbc_on_ogbench_ids_and_unchanged_on_our_envs():
    ogbench_args = gcbc.resolve(
        gcbc.Args(mode="offline", env="antmaze-medium-stitch-v0", dataset="d.npz"), ("reacher",)
    )
    assert (ogbench_args.batch_size, ogbench_args.width, ogbench_args.learning_rate) == (1024, 512, 3e-4)
    assert (ogbench_args.num_epochs, ogbench_args.num_eval_envs, ogbench_args.episode_length) == (10, 50, None)
    assert ogbench_args.goal_sampling == "uniform_future" and ogbench_args.train_steps == 1_000_000
    for mode in ("online", "offline"):
        ours = gcbc.resolve(gcbc.Args(mode=mode, env="reacher"), ("reacher",))
        assert (ours.batch_size, ours.width, ours.num_epochs, ours.num_eval_envs, ours.episode_length) == (
            256,
            256,
            100,
            128,
            1000,
        )
    given = gcbc.resolve(gcbc.Args(mode="offline", env="antmaze-medium-stitch-v0", batch_size=64), ("reacher",))
    assert given.batch_size == 64 and given.width == 512  # a flag given wins
    assert ogbench.is_dataset_id("antmaze-giant-navigate-v0") and ogbench.is_dataset_id("pointmaze-giant-stitch-v0")
    assert not ogbench.is_dataset_id("antmaze-huge-navigate-v0") and not ogbench.is_dataset_id("reacher")


def test_no_goal_policy_has_no_goal_weights_and_ignores_the_goal():
    state_dim, goal_dim = 5, 3
    args = gcbc.Args(width=16, depth=4, no_goal=True)
    policy = gcbc.build_networks(args, 2, state_dim)
    params = policy.init(jax.random.PRNGKey(0), jnp.zeros((1, state_dim + goal_dim)))
    assert params["params"]["tower"]["Dense_0"]["kernel"].shape == (state_dim, 16)
    with_goal = gcbc.build_networks(gcbc.Args(width=16, depth=4), 2, state_dim)
    goal_params = with_goal.init(jax.random.PRNGKey(0), jnp.zeros((1, state_dim + goal_dim)))
    assert goal_params["params"]["tower"]["Dense_0"]["kernel"].shape == (state_dim + goal_dim, 16)
    rng = np.random.default_rng(0)
    state = rng.normal(size=(64, state_dim)).astype(np.float32)
    goals = [rng.normal(size=(64, goal_dim)).astype(np.float32) * scale for scale in (0.0, 1.0, 100.0)]
    outputs = [np.asarray(gcbc.deterministic_action(policy, params, np.concatenate([state, g], -1))) for g in goals]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])
    batch = {"state": state, "goal": goals[1], "action": np.zeros((64, 2), np.float32), "valid": np.ones(64)}
    grads = jax.grad(lambda p: gcbc.bc_loss_fn(p, policy, batch)[0])(params)
    assert np.all(np.isfinite(np.asarray(grads["params"]["tower"]["Dense_0"]["kernel"])))
    # the goal-conditioned policy does read the goal (so the check above can fail)
    moved = [
        np.asarray(gcbc.deterministic_action(with_goal, goal_params, np.concatenate([state, g], -1))) for g in goals
    ]
    assert np.abs(moved[0] - moved[1]).max() > 1e-3
    with pytest.raises(ValueError, match="needs state_dim"):
        gcbc.build_networks(args, 2)


SMALL = [
    "--env",
    "reacher",
    "--depth",
    "4",
    "--width",
    "16",
    "--num-eval-envs",
    "4",
    "--episode-length",
    "20",
    "--batch-size",
    "8",
]


def test_tiny_offline_run_writes_outputs_and_resumes(tmp_path):
    write_dataset(tmp_path / "d.npz", [6, 5, 7])
    run_script(
        *SMALL,
        "--mode",
        "offline",
        "--dataset",
        str(tmp_path / "d.npz"),
        "--train-steps",
        "20",
        "--num-epochs",
        "2",
        "--run-dir",
        str(tmp_path),
        "--run-name",
        "off",
    )
    run = tmp_path / "off"
    rows = read_rows(run)
    assert [r.get("epoch") for r in rows] == [0, 1, None] and rows[1]["sgd_steps"] == 20
    assert "training/bc_loss" in rows[0] and "eval/episode_success" in rows[0]
    checkpoint = runkit.load_checkpoint(str(run), "gcbc")
    assert checkpoint["header"]["script"] == "gcbc" and set(checkpoint["params"]) == {"actor"}
    args = gcbc.Args(**checkpoint["args"])
    runkit.save_checkpoint(str(run), "gcbc", args, checkpoint["state"], 0, 0, 1.0)  # as if stopped

    (run / "summary.json").unlink()
    run_script("--resume", str(run))
    assert [r.get("epoch") for r in read_rows(run)] == [0, 1, None] and (run / "summary.json").exists()


def test_tiny_online_gcsl_run(tmp_path):
    run_script(
        *SMALL,
        "--mode",
        "online",
        "--num-envs",
        "4",
        "--unroll-length",
        "5",
        "--sgd-steps-per-train-step",
        "2",
        "--replay-size",
        "50",
        "--min-replay-size",
        "10",
        "--total-env-steps",
        "200",
        "--num-epochs",
        "2",
        "--goal-sampling",
        "geometric_future",
        "--run-dir",
        str(tmp_path),
        "--run-name",
        "on",
    )
    rows = read_rows(tmp_path / "on")
    assert [r.get("epoch") for r in rows] == [0, 1, None] and rows[1]["env_steps"] == 200
    assert np.isfinite(rows[1]["training/bc_loss"]) and rows[1]["sgd_steps"] == 2 * 4 * 2


# ---- learning check: imitate a scripted reacher controller ------------------------------------------------
LINK1, LINK2 = 0.1, 0.11  # reacher link lengths (envs/assets/reacher.xml)


def scripted_reacher_action(obs, kp=150.0, kd=30.0):
    """Operational-space PD controller: torque = J(q)^T (kp (target - tip) - kd tip_velocity), clipped."""
    c1, c2, s1, s2 = obs[:, 0], obs[:, 1], obs[:, 2], obs[:, 3]
    c12, s12 = c1 * c2 - s1 * s2, s1 * c2 + c1 * s2
    force = kp * (obs[:, 10:12] - obs[:, 4:6]) - kd * obs[:, 7:9]
    t1 = (-LINK1 * s1 - LINK2 * s12) * force[:, 0] + (LINK1 * c1 + LINK2 * c12) * force[:, 1]
    t2 = -LINK2 * s12 * force[:, 0] + LINK2 * c12 * force[:, 1]
    return jnp.clip(jnp.stack([t1, t2], -1), -1.0, 1.0)


def generate_reacher_dataset(path, num_episodes, episode_length, noise, scripted=True):
    """Rolls out the (noisy) scripted controller, or a uniform random policy; returns the mean number of
    steps per episode near the commanded goal."""
    import envs

    env = envs.make("reacher")

    def rollout(key):
        state = jax.vmap(env.reset)(jax.random.split(key, num_episodes))

        def step(state, k):
            if scripted:
                action = scripted_reacher_action(state.obs) + noise * jax.random.normal(k, (num_episodes, 2))
            else:
                action = jax.random.uniform(k, (num_episodes, 2), minval=-1.0, maxval=1.0)
            next_state = jax.vmap(env.step)(state, jnp.clip(action, -1.0, 1.0))
            return next_state, (
                state.obs[:, : env.state_dim],
                jnp.clip(action, -1.0, 1.0),
                next_state.metrics["success"],
            )

        _, (states, actions, success) = jax.lax.scan(step, state, jax.random.split(key, episode_length))
        return states, actions, success.sum(0).mean()

    states, actions, success = jax.jit(rollout)(jax.random.PRNGKey(0))
    flat = lambda x: np.asarray(x).swapaxes(0, 1).reshape(num_episodes * episode_length, -1)
    terminals = np.zeros(num_episodes * episode_length, np.float32)
    terminals[episode_length - 1 :: episode_length] = 1
    if path is not None:
        np.savez(path, observations=flat(states), actions=flat(actions), terminals=terminals)
    return float(success)


@pytest.mark.slow
def test_offline_gcbc_imitates_a_scripted_reacher_demonstrator(tmp_path):
    demo_success = generate_reacher_dataset(tmp_path / "demo.npz", 64, 100, noise=0.3)
    random_success = generate_reacher_dataset(None, 256, 100, noise=0.0, scripted=False)
    run_script(
        "--env",
        "reacher",
        "--mode",
        "offline",
        "--dataset",
        str(tmp_path / "demo.npz"),
        "--width",
        "64",
        "--depth",
        "4",
        "--num-eval-envs",
        "64",
        "--episode-length",
        "100",
        "--learning-rate",
        "1e-3",
        "--train-steps",
        "6000",
        "--num-epochs",
        "3",
        "--run-dir",
        str(tmp_path),
        "--run-name",
        "learn",
        full_optimization=True,
    )
    rows = read_rows(tmp_path / "learn")[:-1]
    losses = [r["training/bc_loss"] for r in rows]
    success = [r["eval/episode_success"] for r in rows]
    print(
        f"GCBC offline reacher: bc_loss per epoch {np.round(losses, 3).tolist()}, eval/episode_success "
        f"{np.round(success, 1).tolist()}; noisy demonstrator {demo_success:.1f}, random {random_success:.1f} (of 100)"
    )
    assert losses[-1] < 0.6 * losses[0]
    assert success[-1] > 3 * random_success and success[-1] > 0.5 * demo_success


# ---- OGBench datasets and evaluation -----------------------------------------------------------------------
OGBENCH_ENV = "pointmaze-medium-navigate-v0"  # 2-D observations and actions: a quick env to roll out here


def test_ogbench_format_rows_are_ogbenchs_transitions_and_goals_stay_in_their_trajectory(tmp_path):
    """OGBench layout: a goal is a whole observation; observation = (trajectory id, time index) here."""
    lengths = [3, 1, 5, 2, 40]
    obs = np.asarray([(i, t) for i, n in enumerate(lengths) for t in range(n)] + [(9, 0), (9, 1)], np.float32)
    terminals = np.zeros(len(obs), np.float32)
    terminals[np.cumsum(lengths) - 1] = 1  # the last 2 rows: an unfinished trajectory, dropped
    np.savez(tmp_path / "d.npz", observations=obs, actions=obs * 0.01, terminals=terminals, qpos=obs, qvel=obs)
    dataset = gcbc.load_dataset(str(tmp_path / "d.npz"), 2, 2)
    assert len(dataset["observations"]) == sum(lengths)
    data = gcbc.device_dataset(dataset)
    # the anchors are exactly the rows OGBench's own loader makes transitions of (which also keeps the
    # unfinished trajectory's first row: offline_crl.py and this script drop unfinished trajectories)
    from ogbench.utils import load_dataset as ogbench_load

    theirs = ogbench_load(str(tmp_path / "d.npz"))["observations"]
    anchors = dataset["observations"][np.asarray(data["anchor_rows"])]
    np.testing.assert_array_equal(theirs[: len(anchors)], anchors)
    assert np.all(theirs[len(anchors) :, 0] == 9)
    batch = gcbc.sample_offline_batch(data, jax.random.PRNGKey(0), 8192, (0, 1), "uniform_future", 0.99)
    s, g = np.asarray(batch["state"]), np.asarray(batch["goal"])
    np.testing.assert_allclose(np.asarray(batch["action"]), s * 0.01)
    assert np.all(g[:, 0] == s[:, 0]) and np.all(g[:, 1] > s[:, 1])  # same trajectory, strictly later
    assert np.all(g[:, 1] <= np.asarray(lengths)[s[:, 0].astype(int)] - 1)
    assert not np.any(s[:, 0] == 1)  # the 1-row trajectory holds no transition
    # OGBench's GCBC goal: uniform over the later rows, k in 1..h (h = rows left): E[k / (h + 1)] = 1/2
    long = s[:, 0] == 4
    k, h = g[long, 1] - s[long, 1], 39 - s[long, 1]
    assert long.sum() > 5000 and abs(np.mean(k / (h + 1)) - 0.5) < 0.015 and np.all(k <= h)
    np.savez(tmp_path / "bad.npz", observations=obs, actions=obs, terminals=terminals, qpos=obs[:-1])
    with pytest.raises(ValueError, match="mismatched lengths"):
        gcbc.load_dataset(str(tmp_path / "bad.npz"), 2, 2)


def make_ogbench_dataset(tmp_path, val=True):
    """A dataset in OGBench's exact format rolled out of the OGBench env here (tools/make_ogbench_dataset)."""
    path = str(tmp_path / "pm.npz")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.make_ogbench_dataset",
            "--env",
            OGBENCH_ENV,
            "--out",
            path,
            "--policy",
            "noisy_oracle",
            "--num-trajectories",
            "6",
            "--trajectory-length",
            "100",
            "--val-trajectories",
            "2" if val else "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return path


OGBENCH_TINY = [
    "--mode",
    "offline",
    "--env",
    OGBENCH_ENV,
    "--width",
    "32",
    "--batch-size",
    "32",
    "--train-steps",
    "40",
    "--num-epochs",
    "2",
    "--num-eval-envs",
    "2",
    "--episode-length",
    "20",
]


# the --no-goal OGBench run with the slow tests (CI time): in CI tests/test_evaluate.py trains and evaluates one,
# and test_no_goal_policy_has_no_goal_weights_and_ignores_the_goal checks its policy
@pytest.mark.parametrize("no_goal", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["gcbc", "bc"])
def test_tiny_offline_run_on_an_ogbench_dataset_evaluates_ogbenchs_tasks(tmp_path, no_goal):
    dataset = make_ogbench_dataset(tmp_path)
    flags = [*OGBENCH_TINY, "--dataset", dataset, "--run-dir", str(tmp_path), "--run-name", "run"]
    run_script(*flags, *(["--no-goal"] if no_goal else []))
    run = tmp_path / "run"
    rows = read_rows(run)
    assert [r.get("epoch") for r in rows] == [0, 1, None] and rows[1]["sgd_steps"] == 40
    assert rows[1]["env_steps"] == 40 and rows[-1]["env_steps"] == 40  # offline: SGD steps, as offline_crl.py
    for r in rows[:-1]:  # offline_crl.py's OGBench metrics, and validation losses from the -val twin
        assert {f"eval/task{i}_success" for i in range(1, 6)} | {"eval/success", "eval/episode_length"} <= set(r)
        assert 0.0 <= r["eval/success"] <= 1.0 and r["eval/episode_length"] <= 20
        assert np.isfinite(r["training/bc_loss"]) and np.isfinite(r["validation/bc_loss"])
    assert rows[0]["training/bc_loss"] > rows[1]["training/bc_loss"]
    assert rows[-1]["eval/success_last5"] == pytest.approx(np.mean([r["eval/success"] for r in rows[:-1]]))
    checkpoint = runkit.load_checkpoint(str(run), "gcbc")
    args = checkpoint["args"]
    assert args["no_goal"] is no_goal and args["width"] == 32 and args["num_epochs"] == 2
    assert args["episode_length"] == 20 and args["learning_rate"] == 3e-4
    first_kernel = checkpoint["params"]["actor"]["params"]["tower"]["Dense_0"]["kernel"]
    assert first_kernel.shape == ((2 if no_goal else 4), 32)  # observation (2) [+ goal observation (2)]


def test_dry_run_on_an_ogbench_dataset_prints_the_costs_and_writes_nothing(tmp_path):
    dataset = make_ogbench_dataset(tmp_path, val=False)
    runs = tmp_path / "runs"
    proc = run_script(*OGBENCH_TINY, "--no-goal", "--dataset", dataset, "--run-dir", str(runs), "--dry-run")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not runs.exists()
    # the policy a real run builds: observation (2) only, width 32, one residual block, mean and log_std heads
    width, blocks = 32, 1
    expected = (2 * width + width + 2 * width) + blocks * 4 * (width * width + width + 2 * width) + 2 * (width * 2 + 2)
    assert report["script"] == "gcbc" and report["params"] == {"actor": expected}
    kernels = 2 * width + blocks * 4 * width * width + 2 * width * 2
    assert report["flops_per_sgd_step"] == 32 * 2 * kernels * 3  # batch x forward x (fwd + 2 backward)
    assert report["buffer_bytes"] == 606 * (2 + 2) * 4 + 606 * 4 + 600 * 4  # obs, actions, traj_end, anchors
    assert report["sgd_steps_per_epoch"] == 20 and report["args"]["no_goal"] is True


@pytest.mark.slow  # CI time (21 s); gcbc resumes in CI in test_tiny_offline_run_writes_outputs_and_resumes
def test_a_resumed_ogbench_run_repeats_the_uninterrupted_one(tmp_path):
    """Roll a 2-epoch run back to epoch 0 (the state of a 1-epoch run with the same steps per epoch): its
    resumed epoch 1 logs the same losses and evaluation bit for bit."""
    dataset = make_ogbench_dataset(tmp_path)
    common = [*OGBENCH_TINY, "--dataset", dataset, "--run-dir", str(tmp_path)]
    run_script(*common, "--run-name", "full")
    short = [*common, "--run-name", "short", "--train-steps", "20", "--num-epochs", "1"]
    run_script(*short)
    full, short = tmp_path / "full", tmp_path / "short"
    uninterrupted = read_rows(full)
    args = gcbc.Args(**runkit.load_checkpoint(str(full), "gcbc")["args"])
    runkit.save_checkpoint(str(full), "gcbc", args, runkit.load_checkpoint(str(short), "gcbc")["state"], 0, 0, 1.0)
    (full / "summary.json").unlink()
    run_script("--resume", str(full))
    resumed = read_rows(full)
    assert [r.get("epoch") for r in resumed] == [0, 1, None]
    for key in ("training/bc_loss", "validation/bc_loss", "eval/success", "eval/episode_length"):
        assert resumed[1][key] == uninterrupted[1][key]
