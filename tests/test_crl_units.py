"""crl_deep.py pieces that need no env: energies, losses, networks, policy, buffer, goal sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import crl_deep as C
import runkit

# --------------------------------------------------------------------------------------------
# energies and losses against hand computation
# --------------------------------------------------------------------------------------------

SA = jnp.array([[0.0, 0.0], [3.0, 4.0]])
G = jnp.array([[0.0, 0.0], [1.0, 0.0]])
EPS = C.SQRT_EPS
HAND = {
    "l2": [[-math.sqrt(EPS), -math.sqrt(1 + EPS)], [-math.sqrt(25 + EPS), -math.sqrt(20 + EPS)]],
    "l2_squared": [[0.0, -1.0], [-25.0, -20.0]],
    "dot": [[0.0, 0.0], [0.0, 3.0]],
    # rows normalised one by one; a zero row stays zero
    "cosine": [[0.0, 0.0], [0.0, 0.6]],
}


@pytest.mark.parametrize("kind", sorted(HAND))
def test_energy_matches_hand_values(kind):
    np.testing.assert_allclose(C.energy(SA, G, kind), HAND[kind], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(C.energy_rowwise(SA, G, kind), np.diag(HAND[kind]), rtol=1e-5, atol=1e-6)


def test_mrn_energy_matches_hand_values():
    # first half symmetric (L2), second half asymmetric (max ReLU of x - y)
    sa = jnp.array([[0.0, 0.0, 1.0, 0.0], [3.0, 4.0, 0.0, 2.0]])
    g = jnp.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    hand = [
        [-(math.sqrt(EPS) + 1.0), -(math.sqrt(1 + EPS) + 0.0)],
        [-(math.sqrt(25 + EPS) + 2.0), -(math.sqrt(20 + EPS) + 1.0)],
    ]
    np.testing.assert_allclose(C.energy(sa, g, "mrn"), hand, rtol=1e-5)
    np.testing.assert_allclose(C.energy_rowwise(sa, g, "mrn"), np.diag(hand), rtol=1e-5)
    # a quasimetric: not symmetric
    assert float(C.energy_rowwise(sa[:1], g[:1], "mrn")[0]) != float(C.energy_rowwise(g[:1], sa[:1], "mrn")[0])


@pytest.mark.parametrize("kind", ["l2", "l2_squared", "dot", "cosine", "mrn"])
def test_energy_gradient_finite_at_zero_distance(kind):
    x = jnp.zeros((3, 4))
    grads = jax.grad(lambda a, b: jnp.sum(C.energy(a, b, kind)), argnums=(0, 1))(x, x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


L = jnp.array([[1.0, 0.0], [2.0, 3.0]])


def _lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def _bce(logit, label):
    return -(label * math.log(1 / (1 + math.exp(-logit))) + (1 - label) * math.log(1 - 1 / (1 + math.exp(-logit))))


def test_losses_match_hand_values():
    rows = [_lse(1, 0), _lse(2, 3)]
    cols = [_lse(1, 2), _lse(0, 3)]
    fwd = -((1 - rows[0]) + (3 - rows[1])) / 2
    bwd = -((1 - cols[0]) + (3 - cols[1])) / 2
    binary = (_bce(1, 1) + _bce(0, 0) + _bce(2, 0) + _bce(3, 1)) / 4
    penalty = (rows[0] ** 2 + rows[1] ** 2) / 2
    hand = {"fwd_infonce": fwd, "bwd_infonce": bwd, "sym_infonce": fwd + bwd, "binary_nce": binary}
    for kind, value in hand.items():
        assert float(C.contrastive_loss(L, kind, 0.0)) == pytest.approx(value, rel=1e-5), kind
        assert float(C.contrastive_loss(L, kind, 0.1)) == pytest.approx(value + 0.1 * penalty, rel=1e-5), kind
    assert fwd == pytest.approx(0.313262, abs=1e-6)  # the numbers above, by hand
    assert bwd == pytest.approx(0.680925, abs=1e-6)


# --------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------


def _primitives(jaxpr):
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for v in eqn.params.values():
            for item in v if isinstance(v, (tuple, list)) else [v]:
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    names += _primitives(inner)
    return names


def test_tower_parameter_count_matches_formula():
    args = C.Args(depth=32, width=256, repr_dim=64)
    nets = C.build_networks(args, 13, 3, 2)
    params = jax.eval_shape(nets.g_encoder.init, jax.random.PRNGKey(0), jnp.zeros((1, 3)))
    w = 256
    layer = w * w + w + 2 * w  # Dense + LayerNorm scale/bias
    formula = (3 * w + w + 2 * w) + 32 * layer + (w * 64 + 64)
    assert runkit.tree_size(params) == formula == 2_139_712  # the paper's ~2M at depth 32


def test_residual_norms_are_recorded_per_block_and_free_otherwise():
    args = C.Args(depth=12, width=8)
    nets = C.build_networks(args, 5, 2, 2)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 2))
    params = nets.g_encoder.init(jax.random.PRNGKey(0), x)
    out, state = nets.g_encoder.apply(params, x, mutable=["intermediates"])
    (norms,) = state["intermediates"]["tower"]["blocks"]["residual_norm"]
    assert norms.shape == (3,)
    # block 0's residual branch, recomputed by hand from its stacked params
    p = params["params"]["tower"]
    h = nn_in = jax.nn.swish(_layer_norm(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], p["LayerNorm_0"]))
    for i in range(4):
        d, ln = p["blocks"][f"Dense_{i}"], p["blocks"][f"LayerNorm_{i}"]
        h = jax.nn.swish(_layer_norm(h @ d["kernel"][0] + d["bias"][0], jax.tree_util.tree_map(lambda a: a[0], ln)))
    assert float(norms[0]) == pytest.approx(float(jnp.mean(jnp.linalg.norm(h, axis=-1))), rel=1e-4)
    assert nn_in.shape == (6, 8)
    plain = _primitives(jax.make_jaxpr(lambda p, x: nets.g_encoder.apply(p, x))(params, x).jaxpr)
    sown = _primitives(
        jax.make_jaxpr(lambda p, x: nets.g_encoder.apply(p, x, mutable=["intermediates"]))(params, x).jaxpr
    )
    assert "sqrt" in sown and "sqrt" not in plain  # rsqrt (LayerNorm) is a different primitive
    np.testing.assert_allclose(out, nets.g_encoder.apply(params, x), rtol=1e-6)


def _layer_norm(h, p, eps=1e-6):
    mean = jnp.mean(h, -1, keepdims=True)
    var = jnp.mean((h - mean) ** 2, -1, keepdims=True)
    return (h - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def test_program_size_does_not_grow_with_depth():
    """The blocks are one scan: the traced program of depth 1024 is as big as that of depth 8."""
    sizes = []
    for depth in (8, 1024):
        nets = C.build_networks(C.Args(depth=depth, width=8), 5, 2, 2)
        params = jax.eval_shape(nets.g_encoder.init, jax.random.PRNGKey(0), jnp.zeros((1, 2)))
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(nets.g_encoder.apply(p, jnp.ones((4, 2))))))(params)
        sizes.append(len(_primitives(jaxpr.jaxpr)))
    assert sizes[0] == sizes[1]


def test_remat_and_unroll_give_the_same_function():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    base = C.build_networks(C.Args(depth=8, width=16), 5, 3, 2).g_encoder
    params = base.init(jax.random.PRNGKey(0), x)

    def grads(net):
        return jax.grad(lambda p: jnp.sum(net.apply(p, x) ** 2))(params)

    ref = grads(base)
    for variant in (C.Args(depth=8, width=16, remat=True), C.Args(depth=8, width=16, scan_unroll=2)):
        got = grads(C.build_networks(variant, 5, 3, 2).g_encoder)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), ref, got)


def test_actor_log_std_range_and_log_prob_matches_change_of_variables():
    mean = jnp.array([[0.3, -1.0]])
    log_std = jnp.array([[-0.5, 0.2]])
    action, log_prob = C.sample_action(mean, log_std, jax.random.PRNGKey(3))
    u = np.arctanh(np.asarray(action, np.float64))
    hand = np.sum(
        stats.norm.logpdf(u, np.asarray(mean), np.exp(np.asarray(log_std)))
        - np.log(1 - np.asarray(action, np.float64) ** 2 + 1e-6)
    )
    assert float(log_prob[0]) == pytest.approx(hand, rel=1e-3)
    nets = C.build_networks(C.Args(depth=4, width=8), 5, 2, 3)
    params = nets.actor.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    _, log_std = nets.actor.apply(params, 100 * jax.random.normal(jax.random.PRNGKey(1), (64, 5)))
    assert float(log_std.min()) >= C.LOG_STD_MIN and float(log_std.max()) <= C.LOG_STD_MAX
    det = C.deterministic_action(nets.actor, params, jnp.ones((2, 5)))
    assert det.shape == (2, 3) and float(jnp.max(jnp.abs(det))) < 1


def test_sgd_step_updates_and_hyperspherical_norm_keeps_unit_columns():
    dims = C.Dims(4, (0, 1), 2)
    args = C.Args(depth=4, width=8, repr_dim=6, batch_size=8, hyperspherical_norm=True)
    nets = C.build_networks(args, 6, 2, 2)
    optimizers = C.make_optimizers(args)
    state = C.init_train_state(jax.random.PRNGKey(0), nets, optimizers, args, dims)
    key = jax.random.PRNGKey(1)
    batch = {"state": jax.random.normal(key, (8, 4)), "action": jnp.zeros((8, 2)), "goal": jnp.ones((8, 2))}
    new, metrics = jax.jit(lambda s, b, k: C.sgd_step(s, b, k, nets, optimizers, args))(state, batch, key)
    assert all(bool(jnp.isfinite(v)) for v in metrics.values())
    assert float(new["log_alpha"]) != 0.0
    kernel = new["params"]["sa_encoder"]["params"]["tower"]["blocks"]["Dense_2"]["kernel"]
    np.testing.assert_allclose(jnp.linalg.norm(kernel, axis=-2), 1.0, rtol=1e-5)
    head = new["params"]["sa_encoder"]["params"]["head"]["kernel"]
    assert not np.allclose(jnp.linalg.norm(head, axis=-2), 1.0)


# --------------------------------------------------------------------------------------------
# replay buffer and goal sampling
# --------------------------------------------------------------------------------------------


def test_truncated_geometric_offsets_chi_square():
    horizon = jnp.full((40_000,), 6)
    k = np.asarray(C.sample_goal_offsets(jax.random.PRNGKey(0), horizon, 0.7))
    assert k.min() >= 1 and k.max() <= 6
    pmf = 0.7 ** np.arange(1, 7)
    pmf /= pmf.sum()
    counts = np.bincount(k, minlength=7)[1:]
    assert stats.chisquare(counts, pmf * len(k)).pvalue > 1e-3
    # a chi-square this test would reject: the untruncated law folded onto the horizon
    assert stats.chisquare(counts, np.full(6, len(k) / 6)).pvalue < 1e-6
    assert int(C.sample_goal_offsets(jax.random.PRNGKey(1), jnp.array([0]), 0.9)[0]) == 0


def _filled_buffer(episode_lengths_per_env, capacity, unroll=7):
    """Two envs; state = [time + 1, env]; episodes of the given lengths, repeated; ring wrapped."""
    total = 95
    traj = np.zeros((total, len(episode_lengths_per_env)), np.int32)
    for e, lengths in enumerate(episode_lengths_per_env):
        t, tid = 0, 0
        while t < total:
            n = lengths[tid % len(lengths)]
            traj[t : t + n, e] = tid
            t, tid = t + n, tid + 1
    buffer = C.buffer_init(capacity, traj.shape[1], 2, 1)
    for start in range(0, total - total % unroll, unroll):
        s = np.stack(
            [
                np.stack([np.full(unroll, 0.0) + np.arange(start, start + unroll) + 1, np.full(unroll, e)], -1)
                for e in range(traj.shape[1])
            ],
            1,
        )
        buffer = C.buffer_insert(
            buffer,
            jnp.asarray(s, jnp.float32),
            jnp.zeros((unroll, traj.shape[1], 1)),
            jnp.asarray(traj[start : start + unroll]),
        )
    return buffer, traj[: total - total % unroll]


def test_buffer_is_a_ring_without_shifting():
    buffer, traj = _filled_buffer([[10], [3, 20]], capacity=40)
    stored = len(traj)  # 91 steps inserted into 40 slots
    assert int(buffer["size"]) == 40 and int(buffer["insert_pos"]) == stored % 40
    times = np.asarray(buffer["state"][:, 0, 0]) - 1
    # slot i holds the latest time t < stored with t % 40 == i
    expected = [max(t for t in range(stored) if t % 40 == i) for i in range(40)]
    np.testing.assert_array_equal(times, expected)


def test_goals_follow_geometric_law_within_the_episode():
    capacity, discount = 40, 0.8
    buffer, traj = _filled_buffer([[10], [3, 20]], capacity=capacity)
    batch = jax.jit(lambda b, k: C.buffer_sample(b, k, 4096, discount, (0,)))(buffer, jax.random.PRNGKey(0))
    t = np.asarray(batch["state"][:, 0]).astype(int) - 1
    env = np.asarray(batch["state"][:, 1]).astype(int)
    g = np.asarray(batch["goal"][:, 0]).astype(int) - 1
    stored = len(traj)
    assert np.all(t >= stored - capacity)  # only filled, not overwritten slots
    assert np.all(g > t)  # never the state itself or its past
    assert np.all(traj[g, env] == traj[t, env])  # never across an episode boundary
    assert np.all(g < stored)
    assert set(env) == {0, 1} and abs(np.mean(env) - 0.5) < 0.05
    # the exact law: anchors uniform over stored steps that have a stored future in their episode,
    # then P(k) ~ discount^k truncated at the episode's last stored step
    expected = np.zeros(capacity)
    for e in range(2):
        anchors = [s for s in range(stored - capacity, stored) if s + 1 < stored and traj[s + 1, e] == traj[s, e]]
        for s in anchors:
            horizon = sum(1 for u in range(s + 1, stored) if traj[u, e] == traj[s, e])
            pmf = discount ** np.arange(1, horizon + 1)
            expected[1 : horizon + 1] += pmf / pmf.sum() / len(anchors) / 2
    counts = np.bincount(g - t, minlength=capacity)[:capacity]
    keep = expected * len(t) >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    wanted = np.append(expected[keep], expected[~keep].sum()) * len(t)
    assert stats.chisquare(observed, wanted).pvalue > 1e-3


def test_sampling_uses_only_filled_slots():
    buffer = C.buffer_init(50, 2, 2, 1)
    s = jnp.stack([jnp.arange(1, 8, dtype=jnp.float32), jnp.zeros(7)], -1)[:, None].repeat(2, 1)
    buffer = C.buffer_insert(buffer, s, jnp.zeros((7, 2, 1)), jnp.zeros((7, 2), jnp.int32))
    batch = C.buffer_sample(buffer, jax.random.PRNGKey(0), 512, 0.99, (0, 1))
    assert float(batch["state"][:, 0].min()) >= 1 and float(batch["goal"][:, 0].min()) >= 2
    assert float(batch["state"][:, 0].max()) <= 6  # the newest step has no stored future


def test_buffer_npz_round_trip_and_terminals(tmp_path):
    buffer, traj = _filled_buffer([[10], [3, 20]], capacity=40)
    runkit.save_buffer(str(tmp_path), buffer, epoch=7)
    data = np.load(tmp_path / "buffer.npz")
    assert data["observations"].shape == (80, 2) and data["actions"].shape == (80, 1)
    times = data["observations"][:40, 0].astype(int) - 1
    np.testing.assert_array_equal(times, np.arange(len(traj) - 40, len(traj)))  # env 0, oldest first
    ends = [t for t in times[:-1] if traj[t + 1, 0] != traj[t, 0]] + [times[-1]]
    np.testing.assert_array_equal(np.flatnonzero(data["terminals"][:40]), [list(times).index(t) for t in ends])
    assert int(data["_epoch"]) == 7
    back = runkit.load_buffer(str(tmp_path / "buffer.npz"), 40)
    a = C.buffer_sample(buffer, jax.random.PRNGKey(5), 64, 0.9, (0,))
    b = C.buffer_sample(jax.tree_util.tree_map(jnp.asarray, back), jax.random.PRNGKey(5), 64, 0.9, (0,))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

ENV_IDS = ("reacher", "ant")


@pytest.mark.parametrize(
    "change, devices, words",
    [
        ({"env": "nope"}, 1, "unknown env 'nope'"),
        ({"depth": 6}, 1, "--depth must be a positive multiple of 4"),
        ({"critic_depth": 0}, 1, "--critic-depth must be a positive multiple of 4"),
        ({"batch_size": 4096, "num_envs": 2, "min_replay_size": 1000}, 1, "larger than the buffer holds"),
        ({"num_envs": 3}, 2, "not divisible by the 2 devices"),
        ({"min_replay_size": 20_000}, 1, "exceeds --replay-size"),
        ({"energy": "mrn", "repr_dim": 63}, 1, "--repr-dim must be even"),
        ({"total_env_steps": 1000}, 1, "leaves no training step per epoch"),
    ],
)
def test_bad_input_fails_with_one_clear_line(change, devices, words):
    with pytest.raises(SystemExit) as err:
        C.check_args(C.Args(**{"env": "reacher", **change}), ENV_IDS, devices)
    message = str(err.value.code)
    assert message.startswith("error: ") and words in message and "\n" not in message


def test_default_args_pass_the_checks():
    C.check_args(C.Args(env="reacher"), ENV_IDS, 1)
