"""td3_her.py: target smoothing and TD targets by hand, delayed actor/target updates, a tiny run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import runkit
import td3_her

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_state(obs_size=5, action_size=2):
    args = td3_her.Args(width=8, depth=4)
    nets = td3_her.build_networks(args, action_size)
    optimizer = td3_her.optax.adam(1e-2)
    return (
        args,
        nets,
        optimizer,
        td3_her.init_train_state(jax.random.PRNGKey(0), nets, optimizer, obs_size, action_size),
    )


def tiny_batch(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda x: jnp.asarray(x, jnp.float32)
    return {
        "obs": f(rng.normal(size=(4, 5))),
        "action": f(rng.uniform(-1, 1, (4, 2))),
        "next_obs": f(rng.normal(size=(4, 5))),
        "reward": f([1, 0, 1, 0]),
        "bootstrap": f([1, 1, 0, 1]),
        "valid": f([1, 1, 1, 0]),
        "relabelled": f([1, 0, 1, 1]),
    }


def test_target_action_noise_is_clipped_then_the_action_is_clipped():
    _, nets, _, ts = tiny_state()
    next_obs = tiny_batch()["next_obs"]
    key = jax.random.PRNGKey(7)
    got = np.asarray(td3_her.smoothed_target_action(nets[0], ts["target_params"]["actor"], next_obs, key, 0.2, 0.5))
    mu = np.asarray(nets[0].apply(ts["target_params"]["actor"], next_obs))
    eps = np.clip(0.2 * np.asarray(jax.random.normal(key, mu.shape)), -0.5, 0.5)
    np.testing.assert_allclose(got, np.clip(mu + eps, -1, 1), rtol=1e-6)
    big = np.asarray(td3_her.smoothed_target_action(nets[0], ts["target_params"]["actor"], next_obs, key, 100.0, 0.5))
    assert np.all(np.abs(big - mu) <= 0.5 + 1e-6) and np.all(np.abs(big) <= 1.0)


def test_critic_loss_on_a_tiny_batch_matches_a_hand_computation():
    args, nets, _, ts = tiny_state()
    target_params = jax.tree_util.tree_map(lambda x: x - 0.05, ts["target_params"])  # differ from online
    batch, key = tiny_batch(), jax.random.PRNGKey(3)
    loss, _ = td3_her.critic_loss_fn(ts["params"]["critic"], target_params, batch, key, nets, args)
    actor, critic = nets
    a_next = td3_her.smoothed_target_action(actor, target_params["actor"], batch["next_obs"], key, 0.2, 0.5)
    q_next = np.asarray(critic.apply(target_params["critic"], batch["next_obs"], a_next)).min(0)
    y = np.array([1, 0, 1, 0]) + 0.9 * np.array([1, 1, 0, 1]) * q_next
    q = np.asarray(critic.apply(ts["params"]["critic"], batch["obs"], batch["action"]))
    per_row = 0.5 * ((q - y) ** 2).sum(0)
    np.testing.assert_allclose(float(loss), per_row[:3].mean(), rtol=1e-5)  # the 4th row is not valid


def test_actor_and_targets_move_only_every_policy_delay_steps():
    args, nets, optimizer, ts = tiny_state()
    step = jax.jit(lambda ts, batch, key: td3_her.sgd_step(ts, batch, key, nets, optimizer, args))
    leaf = lambda tree: np.asarray(jax.tree_util.tree_leaves(tree)[0]).copy()
    actor0, target_critic0 = leaf(ts["params"]["actor"]), leaf(ts["target_params"]["critic"])
    critic0 = leaf(ts["params"]["critic"])
    ts1, m1 = step(ts, tiny_batch(0), jax.random.PRNGKey(0))  # step 0: critic + actor + targets
    assert not np.allclose(leaf(ts1["params"]["actor"]), actor0) and np.isfinite(float(m1["actor_loss"]))
    # Polyak with tau 0.005 from a target equal to the old critic: target = 0.995 old + 0.005 new.
    np.testing.assert_allclose(
        leaf(ts1["target_params"]["critic"]),
        0.995 * target_critic0 + 0.005 * leaf(ts1["params"]["critic"]),
        rtol=1e-5,
        atol=1e-7,
    )
    ts2, m2 = step(ts1, tiny_batch(1), jax.random.PRNGKey(1))  # step 1: the critic only
    assert not np.allclose(leaf(ts2["params"]["critic"]), leaf(ts1["params"]["critic"]))
    np.testing.assert_array_equal(leaf(ts2["params"]["actor"]), leaf(ts1["params"]["actor"]))
    np.testing.assert_array_equal(leaf(ts2["target_params"]["critic"]), leaf(ts1["target_params"]["critic"]))
    assert float(m1["actor_updates"]) == 1 and float(m2["actor_updates"]) == 0 and int(ts2["step"]) == 2
    assert not np.allclose(critic0, leaf(ts2["params"]["critic"]))


def run_script(*flags, check=True):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "td3_her.py"), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bad_input_fails_early_with_one_line(capsys):
    import pytest

    for flags, message in [
        ({"her_ratio": 1.5}, "error: --her-ratio must be in [0, 1] (got 1.5)"),
        ({"policy_delay": 0}, "error: --policy-delay must be positive (got 0)"),
        ({"target_noise": -0.1}, "error: --target-noise must be non-negative (got -0.1)"),
    ]:
        with pytest.raises(SystemExit) as stop:
            td3_her.check_args(td3_her.Args(env="reacher", **flags), ("reacher",), 1)
        assert stop.value.code == message


def test_tiny_run_writes_outputs_and_a_checkpoint(tmp_path):
    run_script(
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
        "3",
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
        "--her-strategy",
        "final",
        "--run-dir",
        str(tmp_path),
        "--run-name",
        "tiny",
    )
    run = tmp_path / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in rows] == [0, 1, None] and rows[1]["env_steps"] == 200
    assert np.isfinite(rows[0]["training/actor_loss"]) and "eval/episode_success" in rows[1]
    checkpoint = runkit.load_checkpoint(str(run), "td3_her")
    assert checkpoint["header"]["script"] == "td3_her" and set(checkpoint["params"]) == {"actor", "critic"}
    assert int(checkpoint["epoch"]) == 1 and checkpoint["args"]["policy_delay"] == 2
    # --resume shares its code with sac_her.py, whose test covers it (one subprocess run less here).


def test_epoch_metrics_average_actor_loss_over_actor_steps_only_and_keep_a_nan():
    steps = {
        "critic_loss": jnp.array([[1.0, 3.0]]),
        "actor_loss": jnp.array([[2.0, 0.0]]),
        "actor_updates": jnp.array([[1.0, 0.0]]),
        "her_fraction": jnp.array([[0.5, 0.5]]),
    }
    out = td3_her.epoch_metrics(td3_her.reduce_metrics(steps))
    assert out == {"critic_loss": 2.0, "actor_loss": 2.0, "actor_updates": 1.0, "her_fraction": 0.5}
    no_actor = td3_her.epoch_metrics(td3_her.reduce_metrics({**steps, "actor_updates": jnp.zeros((1, 2))}))
    assert "actor_loss" not in no_actor  # an epoch without an actor update logs no actor loss, not NaN
    nan = td3_her.epoch_metrics(td3_her.reduce_metrics({**steps, "actor_loss": jnp.array([[jnp.nan, 0.0]])}))
    assert np.isnan(nan["actor_loss"])  # a real NaN is not averaged away
