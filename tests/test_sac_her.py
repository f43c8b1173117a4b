"""sac_her.py: HER relabelling inside one episode, TD targets and target updates by hand, runs end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runkit
import sac_her

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A hand-made ring buffer: 2 envs, capacity 8, full, oldest step at slot 3 (the ring has wrapped).
# Chronological steps per env (episode id, how the step ended):
#   env 0: ids 0 0 0 | 1 1 | 2 2 2    step 2 terminated early, step 4 hit the time limit, 7 is running
#   env 1: ids 5 | 6 6 6 6 6 6 | 7    step 0 terminated, step 6 terminated, step 7 running
TRAJ = np.array([[0, 0, 0, 1, 1, 2, 2, 2], [5, 6, 6, 6, 6, 6, 6, 7]])
TERMINATED = np.zeros((2, 8), bool)
TERMINATED[0, 2] = TERMINATED[1, 0] = TERMINATED[1, 6] = True
ENDED = TERMINATED.copy()
ENDED[0, 4] = True
STATE_DIM, THRESH, OLDEST = 2, 0.25, 3


def achieved_value(env, pos):
    """Unique 1-D achieved goal per (env, chronological step): identifies where a goal came from."""
    return 10.0 * env + pos


def make_buffer():
    capacity, num_envs = 8, 2
    buf = sac_her.buffer_init(capacity, num_envs, STATE_DIM + 1, 1, 1)
    buf = {k: np.array(v) for k, v in buf.items()}
    for env in range(num_envs):
        for pos in range(capacity):
            slot = (OLDEST + pos) % capacity
            buf["obs"][slot, env] = [env, pos, -100.0]  # state = (env, pos); commanded goal far away
            buf["action"][slot, env] = [pos / 10]
            buf["next_achieved"][slot, env] = [achieved_value(env, pos)]
            buf["traj_id"][slot, env] = TRAJ[env, pos]
            buf["ended"][slot, env] = ENDED[env, pos]
            buf["terminated"][slot, env] = TERMINATED[env, pos]
    buf["insert_pos"], buf["size"] = np.int32(OLDEST), np.int32(capacity)
    return jax.tree_util.tree_map(jnp.asarray, buf)


def episode_positions(env, pos):
    return [p for p in range(8) if TRAJ[env, p] == TRAJ[env, pos]]


@pytest.mark.parametrize("strategy", ["future", "final"])
def test_her_goals_come_from_a_later_step_of_the_same_episode(strategy):
    batch = sac_her.sample_her_batch(make_buffer(), jax.random.PRNGKey(0), 4000, 0.8, strategy, STATE_DIM, THRESH)
    batch = jax.tree_util.tree_map(np.asarray, batch)
    env, pos = batch["obs"][:, 0].astype(int), batch["obs"][:, 1].astype(int)
    goal = batch["obs"][:, 2]
    relabelled = batch["relabelled"] > 0
    assert abs(relabelled.mean() - 0.8) < 0.03
    assert np.all(goal[~relabelled] == -100.0)  # untouched goals are the commanded ones
    np.testing.assert_array_equal(batch["next_obs"][:, 2], goal)  # s' carries the same goal
    seen = {}
    for e, p, g in zip(env[relabelled], pos[relabelled], goal[relabelled]):
        goal_env, goal_pos = divmod(int(g), 10)
        assert goal_env == e and TRAJ[e, goal_pos] == TRAJ[e, p] and goal_pos >= p
        if strategy == "final":
            assert goal_pos == max(episode_positions(e, p))
        seen.setdefault((e, p), set()).add(goal_pos)
    if strategy == "future":  # every later step of the episode is drawn for anchor (env 1, pos 2)
        assert seen[(1, 2)] == {2, 3, 4, 5, 6}
    # reward: achieved goal after the step (10 env + pos) within THRESH of the goal
    np.testing.assert_array_equal(batch["reward"], (np.abs(10.0 * env + pos - goal) < THRESH).astype(np.float32))
    assert 0.0 < batch["reward"].mean() < 1.0
    # bootstrap only where the episode did not terminate; valid: a successor is stored, or terminated
    np.testing.assert_array_equal(batch["bootstrap"], (~TERMINATED[env, pos]).astype(np.float32))
    expect_valid = TERMINATED[env, pos] | (~ENDED[env, pos] & (pos < 7))
    np.testing.assert_array_equal(batch["valid"], expect_valid.astype(np.float32))
    ok = ~ENDED[env, pos] & (pos < 7)  # where s' is the next stored state, it is the next step's state
    np.testing.assert_array_equal(batch["next_obs"][ok, :2], np.stack([env[ok], pos[ok] + 1], 1))
    np.testing.assert_allclose(batch["action"][:, 0], pos / 10, rtol=1e-6)


def test_her_ratio_zero_is_plain_sac_and_envs_are_sampled_evenly():
    batch = sac_her.sample_her_batch(make_buffer(), jax.random.PRNGKey(1), 2000, 0.0, "future", STATE_DIM, THRESH)
    assert float(batch["relabelled"].sum()) == 0.0
    assert np.all(np.asarray(batch["obs"][:, 2]) == -100.0) and float(batch["reward"].sum()) == 0.0
    assert abs(float(np.mean(np.asarray(batch["obs"][:, 0]))) - 0.5) < 1e-6  # half the batch from each env


def test_buffer_insert_wraps_around_the_ring():
    buf = sac_her.buffer_init(4, 1, 3, 1, 1)
    chunk = lambda start: {
        "obs": jnp.full((3, 1, 3), start, jnp.float32) + jnp.arange(3.0)[:, None, None],
        "action": jnp.zeros((3, 1, 1)),
        "next_achieved": jnp.zeros((3, 1, 1)),
        "traj_id": jnp.zeros((3, 1), jnp.int32),
        "ended": jnp.zeros((3, 1), bool),
        "terminated": jnp.zeros((3, 1), bool),
    }
    buf = sac_her.buffer_insert(sac_her.buffer_insert(buf, chunk(0.0)), chunk(10.0))
    np.testing.assert_array_equal(np.asarray(buf["obs"][:, 0, 0]), [11.0, 12.0, 2.0, 10.0])
    assert int(buf["insert_pos"]) == 2 and int(buf["size"]) == 4


def test_td_target_and_soft_update_by_hand():
    target = sac_her.td_target(jnp.array([1.0, 0.0, 1.0]), jnp.array([1.0, 1.0, 0.0]), jnp.array([2.0, 3.0, 4.0]), 0.9)
    np.testing.assert_allclose(np.asarray(target), [1.0 + 0.9 * 2.0, 0.9 * 3.0, 1.0], rtol=1e-6)
    new = sac_her.soft_update({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}, 0.25)
    np.testing.assert_allclose(np.asarray(new["w"]), [0.75 * 1 + 0.25 * 3, 0.75 * 2 - 0.25 * 2], rtol=1e-6)


def test_critic_loss_on_a_tiny_batch_matches_a_hand_computation():
    args = sac_her.Args(width=8, depth=4)
    nets = sac_her.build_networks(args, 2)
    ts = sac_her.init_train_state(jax.random.PRNGKey(0), nets, sac_her.optax.adam(1e-3), 5, 2)
    target_critic = jax.tree_util.tree_map(lambda x: x + 0.1, ts["params"]["critic"])  # differ from online
    rng = np.random.default_rng(0)
    batch = {
        "obs": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
        "action": jnp.asarray(rng.uniform(-1, 1, (3, 2)), jnp.float32),
        "next_obs": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
        "reward": jnp.array([1.0, 0.0, 1.0]),
        "bootstrap": jnp.array([1.0, 1.0, 0.0]),
        "valid": jnp.array([1.0, 0.0, 1.0]),
    }
    log_alpha, key = jnp.log(0.5), jax.random.PRNGKey(3)
    loss, _ = sac_her.critic_loss_fn(
        ts["params"]["critic"], target_critic, ts["params"]["actor"], log_alpha, batch, key, nets, 0.9
    )
    actor, critic = nets
    a_next, logp_next = sac_her.sample_action(*actor.apply(ts["params"]["actor"], batch["next_obs"]), key)
    q_next = np.asarray(critic.apply(target_critic, batch["next_obs"], a_next))  # [2, 3]
    y = np.array([1.0, 0.0, 1.0]) + 0.9 * np.array([1.0, 1.0, 0.0]) * (q_next.min(0) - 0.5 * np.asarray(logp_next))
    q = np.asarray(critic.apply(ts["params"]["critic"], batch["obs"], batch["action"]))
    per_row = 0.5 * ((q - y) ** 2).sum(0)
    np.testing.assert_allclose(float(loss), (per_row[0] + per_row[2]) / 2, rtol=1e-5)  # row 1 is masked out


def test_residual_tower_params_scale_with_depth_not_compile_structure():
    nets4 = sac_her.build_networks(sac_her.Args(width=16, depth=4), 2)
    nets12 = sac_her.build_networks(sac_her.Args(width=16, depth=12), 2)
    count = lambda p: sum(x.size for x in jax.tree_util.tree_leaves(p))
    p4 = nets4[0].init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    p12 = nets12[0].init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    block = 4 * (16 * 16 + 16 + 2 * 16)  # 4 x (Dense kernel + bias + LayerNorm scale/bias)
    assert count(p12) - count(p4) == 2 * block
    assert p12["params"]["tower"]["blocks"]["Dense_0"]["kernel"].shape == (3, 16, 16)  # stacked for nn.scan


def run_script(*flags, check=True, full_optimization=False):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"), "WANDB_MODE": "disabled"}
    if full_optimization:  # a compute-bound learning run: drop conftest's fast-compile XLA level
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sac_her.py"), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


TINY = [
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
]


def test_bad_input_fails_early_with_one_line(capsys):
    proc = run_script("--env", "nope", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: unknown env 'nope'")
    for flags, message in [
        ({"depth": 6}, "error: --depth must be a positive multiple of 4 (got 6)"),
        (
            {"min_replay_size": 20, "replay_size": 10},
            "error: --min-replay-size 20 exceeds --replay-size 10 (steps per env)",
        ),
    ]:
        with pytest.raises(SystemExit) as stop:
            sac_her.check_args(sac_her.Args(env="reacher", **flags), ("reacher",), 1)
        assert stop.value.code == message


def test_tiny_run_writes_outputs_and_resumes(tmp_path):
    run_script(*TINY, "--run-dir", str(tmp_path), "--run-name", "tiny")
    run = tmp_path / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows[:-1]] == [0, 1] and rows[-1]["summary"]
    assert "eval/episode_success" in rows[0] and "training/critic_loss" in rows[0]
    assert rows[1]["env_steps"] == 200  # 4 envs x 10 prefill steps + 2 epochs x 4 unrolls x 4 envs x 5 steps
    config = json.loads((run / "config.json").read_text())
    assert config["script"] == "sac_her" and config["args"]["her_ratio"] == 0.8
    checkpoint = runkit.load_checkpoint(str(run), "sac_her")
    assert set(checkpoint["params"]) == {"actor", "critic"} and checkpoint["epoch"] == 1
    # Pretend the run stopped after epoch 0: resume must redo epoch 1 only and finish the summary.
    args, state = sac_her.Args(**checkpoint["args"]), checkpoint["state"]
    runkit.save_checkpoint(str(run), "sac_her", args, state, 0, rows[0]["env_steps"], rows[0]["wall_time"])
    (run / "summary.json").unlink()
    run_script("--resume", str(run))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in rows] == [0, 1, None] and rows[1]["env_steps"] == 200
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def random_policy_success(episode_length, num_envs=256):
    """Steps near the goal per episode of a uniform random policy on reacher (the baseline to beat)."""
    import envs

    env = envs.make("reacher")

    def run(key):
        state = jax.vmap(env.reset)(jax.random.split(key, num_envs))

        def step(state, k):
            state = jax.vmap(env.step)(state, jax.random.uniform(k, (num_envs, env.action_size), minval=-1, maxval=1))
            return state, state.metrics["success"]

        _, success = jax.lax.scan(step, state, jax.random.split(key, episode_length))
        return success.sum(0).mean()

    return float(jax.jit(run)(jax.random.PRNGKey(1)))


@pytest.mark.slow
def test_sac_her_learns_to_reach_on_reacher(tmp_path):
    run_script(
        "--env",
        "reacher",
        "--depth",
        "4",
        "--width",
        "64",
        "--num-envs",
        "16",
        "--num-eval-envs",
        "64",
        "--episode-length",
        "100",
        "--unroll-length",
        "10",
        "--sgd-steps-per-train-step",
        "40",
        "--batch-size",
        "256",
        "--replay-size",
        "2000",
        "--min-replay-size",
        "100",
        "--learning-rate",
        "1e-3",
        "--total-env-steps",
        "21000",
        "--num-epochs",
        "3",
        "--seed",
        "0",
        "--run-dir",
        str(tmp_path),
        "--run-name",
        "learn",
        full_optimization=True,
    )
    rows = [json.loads(line) for line in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()]
    final = rows[-2]["eval/episode_success"]
    baseline = random_policy_success(100)
    print(
        f"SAC+HER reacher: eval/episode_success per epoch {[round(r['eval/episode_success'], 1) for r in rows[:-1]]}, "
        f"random policy {baseline:.1f} (steps near the goal out of 100)"
    )
    assert final > 3 * baseline
