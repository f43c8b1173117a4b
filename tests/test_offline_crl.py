"""offline_crl.py: OGBench-format loading and goal sampling, losses by hand, depth flags, tiny runs on a
dataset rolled out of an OGBench env and on one saved from our own env (crl_deep's buffer.npz layout)."""

import json
import math
import os
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import offline_crl as oc
import runkit
from envs import ogbench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OGBENCH_ENV = "pointmaze-medium-navigate-v0"


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def labelled_dataset(lengths, trailing=0):
    """Trajectories of the given row counts; observation row = (trajectory id, time index)."""
    obs, terminals = [], []
    for traj, n in enumerate(lengths):
        obs += [(traj, t) for t in range(n)]
        terminals += [0.0] * (n - 1) + [1.0]
    obs += [(len(lengths), t) for t in range(trailing)]  # an unfinished trajectory: dropped
    terminals += [0.0] * trailing
    obs = np.asarray(obs, np.float32)
    return {"observations": obs, "actions": obs * 0.1, "terminals": np.asarray(terminals, np.float32)}


def run_script(path, argv):
    """Runs a script's __main__ in this process (saves the interpreter and jax start-up)."""
    old = sys.argv
    sys.argv = [path] + argv
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = old


# ---------------------------------------------------------------------------------------------------
# Loader and sampler
# ---------------------------------------------------------------------------------------------------
def test_loader_splits_at_terminals_and_drops_unfinished_rows(tmp_path):
    raw = labelled_dataset([3, 1, 5], trailing=2)
    data = ogbench.load_dataset(write_npz(tmp_path / "d.npz", **raw))
    assert data["observations"].shape == (9, 2)  # the 2 trailing rows are gone
    rows, end = ogbench.index_trajectories(data["terminals"])
    # transitions: rows 0,1 (traj 0), none in the 1-row traj 1 (row 3), rows 4..7 (traj 2)
    np.testing.assert_array_equal(rows, [0, 1, 4, 5, 6, 7])
    np.testing.assert_array_equal(end, [2, 2, 2, 3, 8, 8, 8, 8, 8])


def test_sampled_next_observations_and_goals_stay_in_their_trajectory(tmp_path):
    raw = labelled_dataset([3, 1, 5, 2, 40], trailing=3)
    data = ogbench.load_dataset(write_npz(tmp_path / "d.npz", **raw))
    device = oc.make_device_dataset(data, np.arange(2))
    batch = oc.sample_batch(device, jax.random.PRNGKey(0), 4096, 0.9)
    s, s_next = np.asarray(batch["observations"]), np.asarray(batch["next_observations"])
    np.testing.assert_array_equal(s_next[:, 0], s[:, 0])  # same trajectory
    np.testing.assert_array_equal(s_next[:, 1], s[:, 1] + 1)  # the next time step
    np.testing.assert_allclose(np.asarray(batch["actions"]), s * 0.1)
    assert not np.any(s[:, 0] == 1)  # the 1-row trajectory holds no transition
    for goals in (batch["value_goals"], batch["actor_goals"]):
        g = np.asarray(goals)
        np.testing.assert_array_equal(g[:, 0], s[:, 0])  # never another trajectory
        assert np.all(g[:, 1] > s[:, 1])  # strictly in the future (k >= 1)
    lengths = np.array([3, 1, 5, 2, 40])
    assert np.all(np.asarray(batch["value_goals"])[:, 1] <= lengths[s[:, 0].astype(int)] - 1)


def test_geometric_and_uniform_goal_offsets_have_the_right_law(tmp_path):
    # one long trajectory: the geometric offset k >= 1 with P(k) ~ gamma^(k-1) has mean 1/(1-gamma)
    long = oc.make_device_dataset(
        ogbench.load_dataset(write_npz(tmp_path / "l.npz", **labelled_dataset([200_000]))), np.arange(2)
    )
    t, _, value_goal, _ = oc.sample_indices(long, jax.random.PRNGKey(1), 20_000, 0.9)
    k = np.asarray(value_goal - t)
    assert k.min() == 1
    assert abs(k.mean() - 10.0) < 0.3  # std of the mean = sqrt(90)/sqrt(20000) = 0.067
    assert abs(np.mean(k == 1) - 0.1) < 0.01
    # 5-row trajectories: from the first row the uniform goal is rows 1..4 with probability 1/4 each
    short = oc.make_device_dataset(
        ogbench.load_dataset(write_npz(tmp_path / "s.npz", **labelled_dataset([5] * 50))), np.arange(2)
    )
    t, _, _, actor_goal = oc.sample_indices(short, jax.random.PRNGKey(2), 40_000, 0.99)
    t, actor_goal = np.asarray(t), np.asarray(actor_goal)
    first = (t % 5) == 0
    counts = np.bincount(actor_goal[first] - t[first], minlength=5)[1:]
    np.testing.assert_allclose(counts / first.sum(), 0.25, atol=0.02)
    assert np.all(actor_goal - t >= 1) and np.all(actor_goal <= (t // 5) * 5 + 4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("actions"), "missing key(s) ['actions']"),
        (lambda d: d.update(terminals=d["terminals"][:-1]), "mismatched lengths"),
        (lambda d: d.update(qpos=np.zeros((3, 2))), "mismatched lengths"),
        (lambda d: d["observations"].__setitem__((2, 1), np.nan), "NaN"),
        (lambda d: d.update(terminals=np.zeros_like(d["terminals"])), "no complete trajectory"),
        (lambda d: d.update(terminals=np.ones_like(d["terminals"])), "no complete trajectory"),
        (lambda d: d.update(terminals=d["terminals"] * 2), "terminals must be 0 or 1"),
        (lambda d: d.update(actions=d["actions"][:, 0]), "expected observations [N, D]"),
    ],
)
def test_bad_datasets_are_rejected_with_their_message(tmp_path, change, message):
    raw = labelled_dataset([3, 4])
    change(raw)
    with pytest.raises(ValueError) as err:
        ogbench.load_dataset(write_npz(tmp_path / "bad.npz", **raw))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_dataset_fails_early_on_the_command_line(tmp_path):
    raw = labelled_dataset([3, 4])
    raw["observations"][0, 0] = np.inf
    path = write_npz(tmp_path / "bad.npz", **raw)
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "offline_crl.py"),
            "--dataset",
            path,
            "--env",
            OGBENCH_ENV,
            "--run-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1  # SystemExit("error: ...") as the other scripts (tools/grid.py reads its text)
    assert result.stderr.strip().splitlines()[-1] == f"error: {path}: observations contain NaN/inf or non-numbers"
    assert sorted(os.listdir(tmp_path)) == ["bad.npz"]


# ---------------------------------------------------------------------------------------------------
# Losses by hand
# ---------------------------------------------------------------------------------------------------
def test_ddpg_bc_actor_loss_matches_a_hand_computation():
    q = jnp.array([1.0, -3.0])
    mean = jnp.array([[0.0, 0.0], [0.5, -0.5]])
    data_actions = jnp.array([[1.0, 0.0], [0.5, 0.5]])
    loss, (q_loss, bc_loss) = oc.ddpg_bc_loss(q, mean, data_actions, 0.1)
    # Q term: -mean(q) / mean|q| = -(-1) / 2 = 0.5
    assert float(q_loss) == pytest.approx(0.5, rel=1e-5)
    # log N(a; mean, I) = -0.5 ||a - mean||^2 - log(2 pi) in 2-D: both rows have ||a - mean||^2 = 1
    log_prob = -0.5 - math.log(2 * math.pi)
    assert float(bc_loss) == pytest.approx(-0.1 * log_prob, rel=1e-5)
    assert float(loss) == pytest.approx(0.5 - 0.1 * log_prob, rel=1e-5)
    # the normaliser is a constant: dL/dq_i = -1 / (B * mean|q|) = -0.25
    grad_q = jax.grad(lambda q: oc.ddpg_bc_loss(q, mean, data_actions, 0.1)[0])(q)
    np.testing.assert_allclose(np.asarray(grad_q), [-0.25, -0.25], rtol=1e-5)
    # dL/dmean = -alpha * (a - mean) / B
    grad_mean = jax.grad(lambda m: oc.ddpg_bc_loss(q, m, data_actions, 0.1)[0])(mean)
    np.testing.assert_allclose(np.asarray(grad_mean), -0.1 * np.asarray(data_actions - mean) / 2, rtol=1e-5)


def test_energies_and_contrastive_losses_by_hand():
    phi = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    psi = jnp.array([[1.0, 0.0], [3.0, 0.0]])
    np.testing.assert_allclose(oc.energy(phi, psi, "dot"), [[1, 3], [0, 0]])
    np.testing.assert_allclose(oc.energy(phi, psi, "scaled_dot"), np.array([[1, 3], [0, 0]]) / math.sqrt(2))
    np.testing.assert_allclose(oc.energy(phi, psi, "l2_squared"), [[0, -4], [-5, -13]], atol=1e-6)
    np.testing.assert_allclose(
        oc.energy(phi, psi, "l2"), -np.sqrt(np.array([[0, 4], [5, 13]]) + oc.SQRT_EPS), rtol=1e-6
    )
    np.testing.assert_allclose(oc.energy(phi, psi, "cosine"), [[1, 1], [0, 0]], atol=1e-6)
    for energy in ("l2", "l2_squared", "dot", "scaled_dot", "cosine"):
        np.testing.assert_allclose(
            oc.energy_rowwise(phi, psi, energy), jnp.diagonal(oc.energy(phi, psi, energy)), rtol=1e-5, atol=1e-6
        )
    logits = jnp.array([[2.0, 0.0], [1.0, 0.0]])
    sp = lambda x: math.log1p(math.exp(x))  # softplus: -log sigmoid(-x)
    # binary NCE: positives -log sigmoid(l), negatives -log(1 - sigmoid(l)), mean over all 4 entries
    expected_bce = (sp(-2.0) + sp(0.0) + sp(1.0) + sp(-0.0)) / 4
    assert float(oc.contrastive_loss(logits, "binary_nce", 0.0)) == pytest.approx(expected_bce, rel=1e-5)
    lse_rows = [math.log(math.exp(2) + 1), math.log(math.exp(1) + 1)]
    lse_cols = [math.log(math.exp(2) + math.exp(1)), math.log(2)]
    penalty = 0.1 * (lse_rows[0] ** 2 + lse_rows[1] ** 2) / 2  # always over rows (as crl_deep.py)
    fwd = -((2 - lse_rows[0]) + (0 - lse_rows[1])) / 2
    bwd = -((2 - lse_cols[0]) + (0 - lse_cols[1])) / 2
    assert float(oc.contrastive_loss(logits, "binary_nce", 0.1)) == pytest.approx(expected_bce + penalty, rel=1e-5)
    assert float(oc.contrastive_loss(logits, "fwd_infonce", 0.1)) == pytest.approx(fwd + penalty, rel=1e-5)
    assert float(oc.contrastive_loss(logits, "bwd_infonce", 0.1)) == pytest.approx(bwd + penalty, rel=1e-5)
    assert float(oc.contrastive_loss(logits, "sym_infonce", 0.1)) == pytest.approx(fwd + bwd + penalty, rel=1e-5)
    # the default penalty weight: OGBench's binary NCE has none, the InfoNCE losses 0.1
    assert oc.resolved_logsumexp_coef(oc.Args(loss="binary_nce")) == 0.0
    assert oc.resolved_logsumexp_coef(oc.Args(loss="fwd_infonce")) == 0.1


@pytest.mark.parametrize("kind", ["l2", "l2_squared", "dot", "scaled_dot", "cosine", "mrn"])
def test_energies_and_losses_are_crl_deeps_on_a_fixed_batch(kind):
    """Same names, same math: offline_crl.py and crl_deep.py give the same logits and critic losses."""
    import crl_deep

    rng = np.random.default_rng(0)
    phi, psi = (jnp.asarray(rng.normal(size=(16, 8)), jnp.float32) for _ in range(2))
    logits = oc.energy(phi, psi, kind)
    np.testing.assert_array_equal(logits, crl_deep.energy(phi, psi, kind))
    np.testing.assert_array_equal(oc.energy_rowwise(phi, psi, kind), crl_deep.energy_rowwise(phi, psi, kind))
    for loss in ("fwd_infonce", "bwd_infonce", "sym_infonce", "binary_nce"):
        assert float(oc.contrastive_loss(logits, loss, 0.1)) == float(crl_deep.contrastive_loss(logits, loss, 0.1))


def test_l2_energy_gradient_is_finite_at_zero_distance():
    z = jnp.ones((3, 4))
    grad = jax.grad(lambda p: jnp.sum(oc.energy(p, z, "l2")))(z)
    assert np.all(np.isfinite(np.asarray(grad)))


# ---------------------------------------------------------------------------------------------------
# Depth flags
# ---------------------------------------------------------------------------------------------------
def test_depth_flags_set_each_network_and_cold_init_shrinks_the_critic_heads():
    obs_dim, goal_dim, action_dim = 5, 3, 2

    def shapes(**kw):  # parameter shapes without running anything (jax.eval_shape)
        args = oc.Args(dataset="x.npz", env=OGBENCH_ENV, width=16, repr_dim=8, **kw)
        sa, g, actor = oc.make_networks(args, action_dim)
        inputs = ((sa, obs_dim + action_dim), (g, goal_dim), (actor, obs_dim + goal_dim))
        return [jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, d))) for net, d in inputs]

    def counts(**kw):
        return tuple(runkit.tree_size(tree) for tree in shapes(**kw))

    block = 4 * (16 * 16 + 16 + 2 * 16)  # 4 x (Dense kernel + bias, LayerNorm scale + bias)
    base = counts(depth=4)
    assert base[2] == (8 * 16 + 16 + 32) + block + (16 * 2 + 2)  # input layer (obs 5 + goal 3), 1 block, head
    assert counts(depth=12) == tuple(c + 2 * block for c in base)
    assert counts(depth=4, critic_depth=8) == (base[0] + block, base[1] + block, base[2])
    assert counts(depth=4, actor_depth=16) == (base[0], base[1], base[2] + 3 * block)
    deep_actor = shapes(depth=4, actor_depth=16)[2]["params"]["tower"]["blocks"]["Dense_0"]["kernel"]
    assert deep_actor.shape == (4, 16, 16)  # stacked block params (nn.scan), not one module per block
    for flag in (True, False):
        args = oc.Args(dataset="x.npz", env=OGBENCH_ENV, width=64, repr_dim=256, cold_init=flag)
        sa, _, actor = oc.make_networks(args, action_dim)
        head = sa.init(jax.random.PRNGKey(0), jnp.zeros((1, obs_dim + action_dim)))["params"]["head"]["kernel"]
        std = float(jnp.std(head))
        # variance scaling 1/3, fan_in 64: std sqrt(1 / (3 * 64)); cold: variance 1e-4 times that
        assert std == pytest.approx((0.01 if flag else 1.0) * math.sqrt(1 / (3 * 64)), rel=0.05)
        assert actor.head_init_scale == 1 / 3  # the actor is never cold


# ---------------------------------------------------------------------------------------------------
# Tiny end-to-end runs
# ---------------------------------------------------------------------------------------------------
TINY = ["--width", "32", "--repr-dim", "16", "--batch-size", "32", "--train-steps", "40", "--eval-every", "20"]


def test_tiny_run_on_a_dataset_rolled_out_of_an_ogbench_env_and_resume(tmp_path):
    dataset = str(tmp_path / "pm.npz")
    run_script(
        os.path.join(ROOT, "tools", "make_ogbench_dataset.py"),
        [
            "--env",
            OGBENCH_ENV,
            "--out",
            dataset,
            "--policy",
            "noisy_oracle",
            "--num-trajectories",
            "6",
            "--trajectory-length",
            "100",
            "--val-trajectories",
            "2",
        ],
    )
    with np.load(dataset) as f:
        assert sorted(f.files) == ["actions", "observations", "qpos", "qvel", "terminals"]
        assert f["observations"].shape == (606, 2) and f["terminals"].sum() == 6
        assert np.all(np.abs(f["actions"]) <= 1)
    assert os.path.exists(str(tmp_path / "pm-val.npz"))
    # OGBench's own loader reads the file; its transitions are exactly ours
    from ogbench.utils import load_dataset as ogbench_load

    theirs = ogbench_load(dataset)
    ours = ogbench.load_dataset(dataset)
    rows, _ = ogbench.index_trajectories(ours["terminals"])
    np.testing.assert_array_equal(theirs["observations"], ours["observations"][rows])
    np.testing.assert_array_equal(theirs["next_observations"], ours["observations"][rows + 1])
    np.testing.assert_array_equal(theirs["actions"], ours["actions"][rows])
    run_script(
        os.path.join(ROOT, "offline_crl.py"),
        [
            "--dataset",
            dataset,
            "--env",
            OGBENCH_ENV,
            "--eval-episodes",
            "1",
            "--eval-episode-length",
            "20",
            "--depth",
            "4",
            "--critic-depth",
            "8",
            "--run-dir",
            str(tmp_path),
            "--run-name",
            "run",
        ]
        + TINY,
    )
    run = tmp_path / "run"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r.get("epoch") for r in rows[:-1]] == [0, 1] and rows[-1]["summary"]
    for r in rows[:-1]:
        assert all(math.isfinite(v) for k, v in r.items() if isinstance(v, float))
        assert {f"eval/task{i}_success" for i in range(1, 6)} <= set(r)
        assert 0.0 <= r["eval/success"] <= 1.0 and r["eval/episode_length"] <= 20
        assert "validation/critic_loss" in r and "training/critic_loss" in r
    assert rows[-1]["eval/success_last5"] == pytest.approx(np.mean([r["eval/success"] for r in rows[:-1]]))
    config = json.load(open(run / "config.json"))
    assert config["script"] == "offline_crl" and config["resolved"]["alpha"] == 0.03
    ckpt = runkit.load_checkpoint(str(run), "offline_crl")
    assert ckpt["env_steps"] == 40 and ckpt["epoch"] == 1  # offline: env_steps counts gradient steps
    assert ckpt["params"]["sa_encoder"]["params"]["tower"]["blocks"]["Dense_0"]["kernel"].shape[0] == 2  # depth 8
    assert ckpt["params"]["actor"]["params"]["tower"]["blocks"]["Dense_0"]["kernel"].shape[0] == 1  # actor depth 4
    # an interrupted run: roll the checkpoint back to epoch 0 and drop the summary, then --resume
    runkit.save_checkpoint(str(run), "offline_crl", oc.Args(**ckpt["args"]), ckpt["state"], 0, 20, 1.0)
    os.remove(run / "summary.json")
    run_script(os.path.join(ROOT, "offline_crl.py"), ["--resume", str(run)])
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r.get("epoch") for r in rows[:-1]] == [0, 1] and rows[-1]["summary"]
    assert rows[1]["train_steps"] == 40 and os.path.exists(run / "summary.json")


def test_tiny_run_on_a_buffer_saved_from_our_own_env(tmp_path):
    import envs

    env = envs.make("reacher")
    train_env = envs.wrap_for_training(env, episode_length=25)
    num_envs, steps = 4, 60

    def step(state, key):
        action = jax.random.uniform(key, (num_envs, env.action_size), minval=-1, maxval=1)
        return train_env.step(state, action), (state.obs[:, : env.state_dim], action, state.info["traj_id"])

    @jax.jit
    def rollout(key):  # reset inside the jit: an un-jitted brax reset costs seconds op by op
        k_reset, k_steps = jax.random.split(key)
        state = train_env.reset(jax.random.split(k_reset, num_envs))
        return jax.lax.scan(step, state, jax.random.split(k_steps, steps))[1]

    obs, actions, traj = rollout(jax.random.PRNGKey(0))
    # crl_deep --save-buffer layout: env after env, terminal where the trajectory id changes or the buffer ends
    obs, actions, traj = (np.swapaxes(np.asarray(x), 0, 1) for x in (obs, actions, traj))
    terminals = np.ones(traj.shape, np.float32)
    terminals[:, :-1] = traj[:, 1:] != traj[:, :-1]
    dataset = write_npz(
        tmp_path / "buffer.npz",
        observations=obs.reshape(num_envs * steps, -1),
        actions=actions.reshape(num_envs * steps, -1),
        terminals=terminals.reshape(-1),
        _traj_id=traj.reshape(-1),
        _num_envs=np.asarray(num_envs),
    )
    assert terminals.sum() == num_envs * 3  # 25-step episodes: ends at 24, 49, and the buffer end 59
    run_script(
        os.path.join(ROOT, "offline_crl.py"),
        [
            "--dataset",
            dataset,
            "--env",
            "reacher",
            "--eval-episodes",
            "2",
            "--eval-episode-length",
            "10",
            "--run-dir",
            str(tmp_path),
            "--run-name",
            "run",
        ]
        + TINY,
    )
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 3 and rows[-1]["summary"]
    for r in rows[:-1]:
        assert 0.0 <= r["eval/episode_success"] <= 10 and r["eval/episode_length"] == 10
        assert math.isfinite(r["training/critic_loss"]) and math.isfinite(r["training/actor_loss"])
    assert json.load(open(tmp_path / "run" / "config.json"))["resolved"]["alpha"] == 0.1
