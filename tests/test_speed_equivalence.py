"""crl_deep's speed work keeps the math: losses and gradients of `sgd_step` equal, within float32
rounding, those of a straightforward reference written here (a Python loop over the stored params,
plain autodiff, the [B, B, D] energy). See docs/performance.md."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import enable_x64

import crl_deep as C

STATE_DIM, GOAL_INDICES, ACTION_SIZE = 6, (0, 1), 2


def ref_dense(p, x):
    return x @ p["kernel"] + p["bias"]


def ref_layer_norm(p, x):
    """flax's LayerNorm: variance as E[x^2] - E[x]^2 (clipped at 0), epsilon 1e-6."""
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.maximum(jnp.mean(x**2, -1, keepdims=True) - mean**2, 0.0)
    return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def ref_tower(p, x):
    """Dense -> LN -> swish, then each stored block (stacked on axis 0) in a Python loop."""
    x = jax.nn.swish(ref_layer_norm(p["LayerNorm_0"], ref_dense(p["Dense_0"], x)))
    blocks = p["blocks"]
    for i in range(blocks["Dense_0"]["kernel"].shape[0]):
        h = x
        for j in range(4):
            dense = jax.tree_util.tree_map(lambda a: a[i], blocks[f"Dense_{j}"])
            norm = jax.tree_util.tree_map(lambda a: a[i], blocks[f"LayerNorm_{j}"])
            h = jax.nn.swish(ref_layer_norm(norm, ref_dense(dense, h)))
        x = x + h
    return x


def ref_encoder(p, x):
    p = p["params"]
    return ref_dense(p["head"], ref_tower(p["tower"], x))


def ref_l2_logits(sa, g):
    return -jnp.sqrt(jnp.sum((sa[:, None, :] - g[None, :, :]) ** 2, -1) + C.SQRT_EPS)


def ref_losses(params, batch, noise, logsumexp_coef=0.1):
    """(critic loss, actor loss, their gradients) with log(alpha) = 0, the paper's forward InfoNCE and
    L2 energy; noise: the policy's standard normal draw [B, A]."""
    s, a, g = batch["state"], batch["action"], batch["goal"]

    def critic(cp):
        logits = ref_l2_logits(
            ref_encoder(cp["sa_encoder"], jnp.concatenate([s, a], -1)), ref_encoder(cp["g_encoder"], g)
        )
        lse = jax.nn.logsumexp(logits, axis=1)
        return -jnp.mean(jnp.diagonal(logits) - lse) + logsumexp_coef * jnp.mean(lse**2)

    g_repr = ref_encoder(params["g_encoder"], g)

    def actor(ap):
        p = ap["params"]
        h = ref_tower(p["tower"], jnp.concatenate([s, g], -1))
        mean, raw = ref_dense(p["mean"], h), ref_dense(p["log_std"], h)
        log_std = C.LOG_STD_MIN + 0.5 * (C.LOG_STD_MAX - C.LOG_STD_MIN) * (jnp.tanh(raw) + 1)
        std = jnp.exp(log_std)
        pre_tanh = mean + std * noise
        action = jnp.tanh(pre_tanh)
        log_prob = jnp.sum(
            -0.5 * ((pre_tanh - mean) / std) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi) - jnp.log(1 - action**2 + 1e-6),
            -1,
        )
        sa = ref_encoder(params["sa_encoder"], jnp.concatenate([s, action], -1))
        q = -jnp.sqrt(jnp.sum((sa - g_repr) ** 2, -1) + C.SQRT_EPS)
        return jnp.mean(log_prob - q)

    critic_params = {"sa_encoder": params["sa_encoder"], "g_encoder": params["g_encoder"]}
    critic_loss, critic_grads = jax.value_and_grad(critic)(critic_params)
    actor_loss, actor_grads = jax.value_and_grad(actor)(params["actor"])
    return critic_loss, actor_loss, critic_grads, actor_grads


def fixed_batch(batch_size):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(42), 3)
    return {
        "state": jax.random.normal(k1, (batch_size, STATE_DIM)),
        "action": jax.random.uniform(k2, (batch_size, ACTION_SIZE), minval=-1, maxval=1),
        "goal": jax.random.normal(k3, (batch_size, len(GOAL_INDICES))),
    }


def relative_error(actual, expected) -> float:
    """Largest difference over the largest entry of `expected` (gradients span many magnitudes)."""
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / (np.max(np.abs(expected)) + 1e-12))


def assert_trees_close(actual, expected, rtol):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected)):
        err = relative_error(a, b)
        assert err < rtol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


def assert_as_close_as_float32_allows(actual, ref32, ref64, rtol=2e-4):
    """actual (float32) is within 4x the float32 reference's own error from the float64 reference, or
    within rtol of it. The actor's log(1 - tanh(x)^2 + 1e-6) at a saturated action magnifies
    rounding: there the float32 reference itself is 1e-4 (loss) to 1e-2 (log_std bias gradient) off."""
    leaves = zip(*(jax.tree_util.tree_leaves(t) for t in (actual, ref32, ref64)))
    for path, (a, r32, r64) in zip(jax.tree_util.tree_leaves_with_path(actual), leaves):
        err, float32_err = relative_error(a, r64), relative_error(r32, r64)
        assert err <= max(4 * float32_err, rtol), (
            f"{jax.tree_util.keystr(path[0])}: {err:.2e} vs float32's {float32_err:.2e}"
        )


# (8, False, 1), the plain scan over 2 blocks, is in (8, True, 1) and (12, False, 2): with the slow tests (CI time)
@pytest.mark.parametrize(
    "depth, remat, scan_unroll",
    [(4, False, 1), pytest.param(8, False, 1, marks=pytest.mark.slow), (8, True, 1), (12, False, 2)],
    ids=str,
)
def test_sgd_step_losses_and_gradients_match_reference(depth, remat, scan_unroll):
    args = C.Args(depth=depth, width=32, repr_dim=16, batch_size=16, remat=remat, scan_unroll=scan_unroll)
    dims = C.Dims(STATE_DIM, GOAL_INDICES, ACTION_SIZE)
    nets = C.build_networks(args, 0, 0, ACTION_SIZE)
    optimizers = C.make_optimizers(args)
    state = C.init_train_state(jax.random.PRNGKey(0), nets, optimizers, args, dims)
    batch, key = fixed_batch(args.batch_size), jax.random.PRNGKey(7)
    noise = jax.random.normal(key, (args.batch_size, ACTION_SIZE))  # sample_action's draw
    new_state, metrics = jax.jit(lambda s, b, k: C.sgd_step(s, b, k, nets, optimizers, args))(state, batch, key)
    ref32 = ref_losses(state["params"], batch, noise)
    with enable_x64():
        to64 = partial(jax.tree_util.tree_map, lambda a: jnp.asarray(np.asarray(a), jnp.float64))
        ref64 = jax.tree_util.tree_map(np.asarray, ref_losses(to64(state["params"]), to64(batch), to64(noise)))
    # Adam's first moment after one step is (1 - b1) * gradient: the gradients sgd_step used.
    grads = [
        jax.tree_util.tree_map(lambda m: m / 0.1, new_state[name][0].mu)
        for name in ("critic_opt_state", "actor_opt_state")
    ]
    step = (metrics["critic_loss"], metrics["actor_loss"], *grads)
    assert_as_close_as_float32_allows(step, ref32, ref64)
    # and the critic, which has no saturating squash, as tightly as float32 allows anywhere
    np.testing.assert_allclose(metrics["critic_loss"], ref64[0], rtol=1e-5)
    assert_trees_close(grads[0], ref64[2], 1e-4)


@pytest.mark.parametrize("kind", ["l2", "l2_squared"])
@pytest.mark.parametrize("spread", [1.0, 1e-3], ids=["random", "all_alike"])
@pytest.mark.parametrize("rows, cols", [(32, 32), (20, 7)], ids=["32x32", "20x7"])
def test_energy_matrix_gradient_matches_autodiff_of_differences(kind, spread, rows, cols):
    """`energy`'s hand-written backward (pairwise_sq_dist) against autodiff of the [B, B, D] form,
    including the case where every representation is alike (as at init) and x.y forms would cancel,
    and sizes that are not multiples of its chunk of rows."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    base = 3 * jax.random.normal(k1, (1, 24))
    x, y = base + spread * jax.random.normal(k2, (rows, 24)), base + spread * jax.random.normal(k3, (cols, 24))
    weights = jax.random.normal(k1, (rows, cols))  # 20 rows: chunks of 4; 7: chunks of 1

    def loss(energy_fn, a, b):
        return jnp.sum(weights * energy_fn(a, b))

    fast = jax.value_and_grad(lambda a, b: loss(lambda p, q: C.energy(p, q, kind), a, b), (0, 1))(x, y)
    ref = jax.value_and_grad(
        lambda a, b: loss(lambda p, q: C.energy_rowwise(p[:, None, :], q[None, :, :], kind), a, b), (0, 1)
    )(x, y)
    np.testing.assert_allclose(fast[0], ref[0], rtol=1e-6)
    assert_trees_close(fast[1], ref[1], 1e-5)
