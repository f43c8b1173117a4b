"""Offline contrastive RL (CRL) on OGBench-format datasets, with the paper's residual towers (Sec. 4.6, A.8).

    python offline_crl.py --dataset data/pointmaze-medium-navigate-v0.npz --env pointmaze-medium-navigate-v0
    python offline_crl.py --dataset runs/<online run>/buffer.npz --env reacher     # our own envs/ tasks

The dataset is an OGBench `.npz` (`observations`, `actions`, `terminals`: 1 on the last row of each
trajectory; a `-val.npz` twin beside it is used for validation losses). The critic phi(s, a), psi(g)
is trained with a contrastive loss on (s, a, future goal of the same trajectory); the actor with
DDPG+BC: `-Q / stop_grad(mean |Q|) - alpha * log pi(a_data | s, g)`. Evaluation runs the deterministic
actor on the 5 OGBench tasks of `--env` (a host loop over the gymnasium env, the policy jitted), or
with `envs.evaluate` when `--env` is one of our `envs/` ids. Host code (run folder, checkpoints, logging)
is the `runkit` package; the dataset format and OGBench's evaluation are `envs/ogbench.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from functools import partial
from typing import Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import envs
import runkit
from envs import ogbench


@dataclasses.dataclass(frozen=True)
class Args(runkit.RunFlags):
    dataset: str = ""
    """OGBench-format .npz (observations, actions, terminals); a `<name>-val.npz` twin is used when present"""
    env: str = ""
    """evaluation env: an OGBench env/dataset name (e.g. antmaze-medium-navigate-v0) or one of our envs/ ids"""
    train_steps: int = 1_000_000
    """gradient steps in total"""
    eval_every: int = 100_000
    """gradient steps between evaluations (one epoch: log, evaluate, checkpoint)"""
    eval_episodes: int = 50
    """OGBench: episodes per task (5 tasks); envs/ ids: number of evaluation envs (one episode each)"""
    eval_episode_length: Optional[int] = None
    """cap on evaluation episode length (default: the env's own limit, 1000 for OGBench mazes)"""
    depth: int = 4
    """Dense layers inside the residual blocks of every network (a positive multiple of 4)"""
    critic_depth: Optional[int] = None
    """depth of the critic encoders phi and psi (default: --depth)"""
    actor_depth: Optional[int] = None
    """depth of the actor (default: --depth)"""
    width: int = 512
    """width of every hidden layer (OGBench default 512)"""
    layer_norm: bool = True
    """LayerNorm after every hidden Dense (the paper's scaling recipe; --no-layer-norm ablates it)"""
    activation: Literal["swish", "relu"] = "swish"
    """hidden activation (relu only as the paper's ablation)"""
    remat: bool = False
    """recompute each residual block in the backward pass (least memory, one extra forward pass);
    without it only the blocks' matmul outputs are kept and LayerNorm/swish are recomputed"""
    scan_unroll: int = 1
    """residual blocks unrolled per iteration of the scan over blocks (speed vs compile time)"""
    matmul_precision: Literal["default", "float32", "bfloat16"] = "default"
    """default: jax's own float32 matmuls (float32 on CPU, TensorFloat32 on NVIDIA Ampere/Hopper GPUs);
    float32: full float32 on every backend; bfloat16: the towers' Dense layers compute in bfloat16
    (params, LayerNorm, heads and losses stay float32; docs/gpu.md)"""
    repr_dim: int = 512
    """size of the representations phi(s, a) and psi(g)"""
    batch_size: int = 1024
    """transitions per gradient step; the other rows' goals are the negatives"""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor"""
    critic_lr: float = 3e-4
    """Adam learning rate of phi and psi"""
    discount: Optional[float] = None
    """value goals are s_{t+k} with P(k) ~ discount^k (default 0.99; 0.995 for giant and humanoid mazes)"""
    alpha: Optional[float] = None
    """behaviour-cloning weight of the actor loss (default: 0.1 antmaze and our envs, 0.03 pointmaze, 0.003 explore)"""
    energy: Literal["l2", "l2_squared", "dot", "scaled_dot", "cosine", "mrn"] = "scaled_dot"
    """critic energy f(s,a,g): -||phi-psi||, -||phi-psi||^2, phi.psi, phi.psi/sqrt(repr_dim) (OGBench), cosine,
    or the MRN quasimetric (-d)"""
    loss: Literal["binary_nce", "fwd_infonce", "bwd_infonce", "sym_infonce"] = "binary_nce"
    """critic loss: sigmoid cross-entropy against the identity (OGBench) or InfoNCE over rows/columns/both"""
    logsumexp_coef: Optional[float] = None
    """weight of the penalty mean_i(logsumexp_j logits[i, j])^2 added to the critic loss (default: 0.1 for the
    InfoNCE losses, 0 for binary_nce as in OGBench)"""
    cold_init: bool = False
    """initialise the final layer of phi and psi 100x smaller (the paper's cold-init ablation)"""


SCRIPT = "offline_crl"
COLD_INIT_SCALE = 1e-4  # variance factor of the cold-init head: weights 100x smaller


# ---- Networks: the paper's residual tower (lecun-uniform Dense, LayerNorm, swish; blocks of 4 with a skip) ----

# --- shared block: tower (identical in every script; tests/test_copies.py) ---
# The paper's residual network. Every Dense: variance scaling 1/3, fan_in, uniform (its "lecun_uniform"), bias 0.
kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
ACTIVATIONS = {"swish": nn.swish, "relu": nn.relu}


def layer_norm_dtype(dense_dtype):
    """LayerNorm outputs float32 after bfloat16 Dense layers (statistics, residual stream); else inferred."""
    return None if dense_dtype is None else jnp.float32


class ResidualBlock(nn.Module):
    """4 x [Dense -> LayerNorm -> activation], then add the block input; a scan body (carry, _) -> (carry, None).
    With 'intermediates' mutable it sows the residual branch's mean L2 norm (otherwise it is not traced)."""

    width: int
    layer_norm: bool
    activation: str
    dtype: Optional[type] = None  # the Dense layers' compute dtype (None: that of the float32 params)

    @nn.compact
    def __call__(self, x, _):
        h = x
        for _ in range(4):
            h = nn.Dense(self.width, kernel_init=kernel_init, dtype=self.dtype)(h)
            if self.layer_norm:
                h = nn.LayerNorm(dtype=layer_norm_dtype(self.dtype))(h)
            h = ACTIVATIONS[self.activation](h)
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "residual_norm", jnp.mean(jnp.linalg.norm(h, axis=-1)))
        return x + h, None


class Tower(nn.Module):
    """Input Dense(width) -> LN -> act, then depth/4 residual blocks scanned over stacked params. dtype: the Dense
    layers' compute dtype (None: exactly the float32 tower); params, LayerNorm and the residual stream float32."""

    depth: int
    width: int
    layer_norm: bool = True
    activation: str = "swish"
    remat: bool = False
    scan_unroll: int = 1
    dtype: Optional[type] = None

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width, kernel_init=kernel_init, dtype=self.dtype)(x)
        if self.layer_norm:
            x = nn.LayerNorm(dtype=layer_norm_dtype(self.dtype))(x)
        x = ACTIVATIONS[self.activation](x)
        if self.dtype is not None:  # without LayerNorm the activation is still bfloat16
            x = x.astype(jnp.float32)
        # Backward pass from two blocks up: keep the matmul outputs, recompute LayerNorm/swish (faster on CPU from
        # depth 16, less memory). One block saves everything; --remat keeps only block inputs (least memory).
        if self.remat:
            block = nn.remat(ResidualBlock, prevent_cse=False)
        elif self.depth > 4:
            block = nn.remat(ResidualBlock, prevent_cse=False, policy=jax.checkpoint_policies.checkpoint_dots)
        else:
            block = ResidualBlock
        axes = {"variable_axes": {"params": 0, "intermediates": 0}, "split_rngs": {"params": True}}
        blocks = nn.scan(block, **axes, length=self.depth // 4, unroll=self.scan_unroll)
        x, _ = blocks(self.width, self.layer_norm, self.activation, self.dtype, name="blocks")(x, None)
        return x


def make_tower(args, depth: int) -> Tower:
    """A tower of `depth` as --width, --layer-norm, --activation, --remat, --scan-unroll, --matmul-precision say."""
    dtype = jnp.bfloat16 if args.matmul_precision == "bfloat16" else None
    return Tower(depth, args.width, args.layer_norm, args.activation, args.remat, args.scan_unroll, dtype)


# --- end shared block: tower ---


class Encoder(nn.Module):
    """The tower, then a linear Dense(out_dim) head: phi(s, a), psi(g), or the actor's mean."""

    tower: Tower
    out_dim: int
    head_init_scale: float = 1 / 3

    @nn.compact
    def __call__(self, x):
        head_init = nn.initializers.variance_scaling(self.head_init_scale, "fan_in", "uniform")
        return nn.Dense(self.out_dim, kernel_init=head_init, name="head")(self.tower(x))


def make_networks(args: Args, action_dim: int):
    """(sa_encoder phi(concat[s, a]), g_encoder psi(g), actor mean(concat[s, g]))."""
    critic_depth = args.critic_depth or args.depth
    head_scale = COLD_INIT_SCALE / 3 if args.cold_init else 1 / 3
    sa_encoder = Encoder(make_tower(args, critic_depth), args.repr_dim, head_scale)
    g_encoder = Encoder(make_tower(args, critic_depth), args.repr_dim, head_scale)
    actor = Encoder(make_tower(args, args.actor_depth or args.depth), action_dim)
    return sa_encoder, g_encoder, actor


# ---- Energies and losses -------------------------------------------------------------------------

# --- shared block: energies (identical in every script; tests/test_copies.py) ---
SQRT_EPS = 1e-6  # inside every square root: finite gradients at zero distance and zero norm


def contrastive_loss(logits, kind: str, logsumexp_coef: float):
    """Critic loss on logits [B, B] whose diagonal holds the positive pairs.

    fwd_infonce: softmax over goals (rows); bwd_infonce: over state-actions (columns);
    sym_infonce: fwd + bwd; binary_nce: sigmoid cross-entropy against the identity, averaged over
    all B^2 entries. Every variant adds logsumexp_coef * mean_i(logsumexp_j logits[i, j])^2.
    """
    diag = jnp.diagonal(logits)
    lse_rows = jax.nn.logsumexp(logits, axis=1)
    if kind == "fwd_infonce":
        loss = -jnp.mean(diag - lse_rows)
    elif kind == "bwd_infonce":
        loss = -jnp.mean(diag - jax.nn.logsumexp(logits, axis=0))
    elif kind == "sym_infonce":
        loss = -jnp.mean(diag - lse_rows) - jnp.mean(diag - jax.nn.logsumexp(logits, axis=0))
    elif kind == "binary_nce":
        loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.eye(logits.shape[0])))
    else:
        raise ValueError(f"unknown loss {kind!r}")
    return loss + logsumexp_coef * jnp.mean(lse_rows**2)


def energy_rowwise(sa_repr, g_repr, kind: str):
    """Energy f(phi, psi) of matching rows: [..., D] x [..., D] -> [...] (broadcasting)."""
    if kind == "l2":
        return -jnp.sqrt(jnp.sum((sa_repr - g_repr) ** 2, axis=-1) + SQRT_EPS)
    if kind == "l2_squared":
        return -jnp.sum((sa_repr - g_repr) ** 2, axis=-1)
    if kind == "dot":
        return jnp.sum(sa_repr * g_repr, axis=-1)
    if kind == "scaled_dot":  # OGBench's CRL critic: dot / sqrt(D)
        return jnp.sum(sa_repr * g_repr, axis=-1) / math.sqrt(sa_repr.shape[-1])
    if kind == "cosine":  # each row normalised on its own
        return jnp.sum(_unit_rows(sa_repr) * _unit_rows(g_repr), axis=-1)
    if kind == "mrn":  # MRN quasimetric: symmetric L2 half + asymmetric max-ReLU half, energy = -d
        half = sa_repr.shape[-1] // 2
        sym = jnp.sqrt(jnp.sum((sa_repr[..., :half] - g_repr[..., :half]) ** 2, axis=-1) + SQRT_EPS)
        asym = jnp.max(jax.nn.relu(sa_repr[..., half:] - g_repr[..., half:]), axis=-1)
        return -(sym + asym)
    raise ValueError(f"unknown energy {kind!r}")


def energy(sa_repr, g_repr, kind: str):
    """Logits [B, B]: logits[i, j] = f(phi(s_i, a_i), psi(g_j)); the diagonal is `energy_rowwise`.

    Products go through one matmul ([B, B] memory). Distances are taken on the differences, exact
    where phi ~ psi (the expanded |x|^2 + |y|^2 - 2 x.y cancels there: gradient errors of 1e-3
    when every representation is alike, as at init), via `pairwise_sq_dist` for l2 and l2_squared.
    """
    if kind in ("dot", "scaled_dot", "cosine"):
        if kind == "cosine":
            sa_repr, g_repr = _unit_rows(sa_repr), _unit_rows(g_repr)
        logits = jnp.matmul(sa_repr, g_repr.T, precision=jax.lax.Precision.HIGHEST)
        return logits / math.sqrt(sa_repr.shape[-1]) if kind == "scaled_dot" else logits
    if kind == "l2":
        return -jnp.sqrt(pairwise_sq_dist(sa_repr, g_repr) + SQRT_EPS)
    if kind == "l2_squared":
        return -pairwise_sq_dist(sa_repr, g_repr)
    return energy_rowwise(sa_repr[:, None, :], g_repr[None, :, :], kind)


PAIRWISE_CHUNK = 16  # rows per chunk of pairwise_sq_dist: a [16, C, D] product stays in cache


def _chunked_rows(fn, *arrays):
    """fn(*chunks) over chunks of PAIRWISE_CHUNK rows of the arrays (one lax.map), results concatenated:
    the [chunk, C, D] intermediates stay in cache instead of one stored [B, C, D] tensor."""
    n = arrays[0].shape[0]
    chunk = math.gcd(n, PAIRWISE_CHUNK)
    out = jax.lax.map(lambda xs: fn(*xs), tuple(a.reshape(n // chunk, chunk, *a.shape[1:]) for a in arrays))
    return out.reshape(n, *out.shape[2:])


def _pairwise_sq_dist_value(x, y):
    return _chunked_rows(lambda rows: jnp.sum((rows[:, None, :] - y[None, :, :]) ** 2, axis=-1), x)


@jax.custom_vjp
def pairwise_sq_dist(x, y):
    """[B, D] x [C, D] -> [B, C]: sum_k (x[i, k] - y[j, k])^2, taken on the differences."""
    return _pairwise_sq_dist_value(x, y)


def _pairwise_sq_dist_fwd(x, y):
    return _pairwise_sq_dist_value(x, y), (x, y)


def _pairwise_sq_dist_bwd(residuals, grad):
    """The gradient autodiff takes, 2 sum_j g[i, j] (x[i] - y[j]) and 2 sum_i g[i, j] (y[j] - x[i]),
    each summed along the last-but-one axis of a chunk's product: autodiff stores [B, C, D] and sums
    one input's part along the first axis: 2-4x the CPU time (docs/performance.md)."""
    x, y = residuals

    def weighted_differences(g, a, b):
        return 2 * jnp.sum(g[:, :, None] * (a[:, None, :] - b[None, :, :]), axis=1)

    grad_x = _chunked_rows(lambda g, a: weighted_differences(g, a, y), grad, x)
    grad_y = _chunked_rows(lambda g, b: weighted_differences(g, b, x), grad.T, y)
    return grad_x, grad_y


pairwise_sq_dist.defvjp(_pairwise_sq_dist_fwd, _pairwise_sq_dist_bwd)


def _unit_rows(x):
    return x / jnp.sqrt(jnp.sum(x**2, axis=-1, keepdims=True) + SQRT_EPS)


# --- end shared block: energies ---


# --- shared block: ddpg_bc (identical in every script; tests/test_copies.py) ---
def gaussian_log_prob(mean, actions):
    """log N(actions; mean, I): the actor is a unit-std Gaussian (OGBench's constant-std actor)."""
    return jnp.sum(-0.5 * (actions - mean) ** 2 - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def ddpg_bc_loss(q, mean, data_actions, alpha):
    """-mean(Q) / stop_grad(mean |Q|) - alpha * mean(log pi(a_data)): the Q term is scale free."""
    q_loss = -jnp.mean(q) / jax.lax.stop_gradient(jnp.mean(jnp.abs(q)) + 1e-6)
    bc_loss = -alpha * jnp.mean(gaussian_log_prob(mean, data_actions))
    return q_loss + bc_loss, (q_loss, bc_loss)


def policy_action(actor, actor_params, observations, goals):
    """Deterministic action: the Gaussian mean clipped to the action box."""
    return jnp.clip(actor.apply(actor_params, jnp.concatenate([observations, goals], -1)), -1.0, 1.0)


# --- end shared block: ddpg_bc ---


def make_losses(args: Args, sa_encoder, g_encoder, actor, alpha: float):
    def critic_loss_fn(critic_params, batch):
        sa = jnp.concatenate([batch["observations"], batch["actions"]], -1)
        phi = sa_encoder.apply(critic_params["sa_encoder"], sa)
        psi = g_encoder.apply(critic_params["g_encoder"], batch["value_goals"])
        logits = energy(phi, psi, args.energy)
        loss = contrastive_loss(logits, args.loss, resolved_logsumexp_coef(args))
        eye = jnp.eye(logits.shape[0])
        metrics = {
            "critic_loss": loss,
            "categorical_accuracy": jnp.mean(jnp.argmax(logits, 1) == jnp.arange(logits.shape[0])),
            "logits_pos": jnp.sum(logits * eye) / jnp.sum(eye),
            "logits_neg": jnp.sum(logits * (1 - eye)) / jnp.sum(1 - eye),
        }
        return loss, metrics

    def actor_loss_fn(actor_params, critic_params, batch):
        obs, goals = batch["observations"], batch["actor_goals"]
        mean = actor.apply(actor_params, jnp.concatenate([obs, goals], -1))
        q_actions = jnp.clip(mean, -1.0, 1.0)
        phi = sa_encoder.apply(critic_params["sa_encoder"], jnp.concatenate([obs, q_actions], -1))
        psi = g_encoder.apply(critic_params["g_encoder"], goals)
        q = energy_rowwise(phi, psi, args.energy)
        loss, (q_loss, bc_loss) = ddpg_bc_loss(q, mean, batch["actions"], alpha)
        return loss, {
            "actor_loss": loss,
            "q_loss": q_loss,
            "bc_loss": bc_loss,
            "q_mean": jnp.mean(q),
            "bc_mse": jnp.mean((mean - batch["actions"]) ** 2),
        }

    return critic_loss_fn, actor_loss_fn


# ---- Train state and the update ------------------------------------------------------------------


def init_train_state(
    key, sa_encoder, g_encoder, actor, obs_dim, action_dim, goal_dim, actor_optimizer, critic_optimizer
):
    k_sa, k_g, k_actor = jax.random.split(key, 3)
    critic = {
        "sa_encoder": sa_encoder.init(k_sa, jnp.zeros((1, obs_dim + action_dim))),
        "g_encoder": g_encoder.init(k_g, jnp.zeros((1, goal_dim))),
    }
    actor_params = actor.init(k_actor, jnp.zeros((1, obs_dim + goal_dim)))
    return {
        "critic": critic,
        "actor": actor_params,
        "critic_opt": critic_optimizer.init(critic),
        "actor_opt": actor_optimizer.init(actor_params),
    }


def make_update(critic_loss_fn, actor_loss_fn, critic_optimizer, actor_optimizer):
    def update(train_state, batch):
        """One gradient step of critic and actor, both from the same (pre-update) critic."""
        (_, critic_metrics), critic_grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            train_state["critic"], batch
        )
        (_, actor_metrics), actor_grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
            train_state["actor"], train_state["critic"], batch
        )
        critic_updates, critic_opt = critic_optimizer.update(critic_grads, train_state["critic_opt"])
        actor_updates, actor_opt = actor_optimizer.update(actor_grads, train_state["actor_opt"])
        train_state = {
            "critic": optax.apply_updates(train_state["critic"], critic_updates),
            "actor": optax.apply_updates(train_state["actor"], actor_updates),
            "critic_opt": critic_opt,
            "actor_opt": actor_opt,
        }
        return train_state, {**critic_metrics, **actor_metrics}

    return update


# ---- Dataset sampling: (s, a, s', geometric goal, uniform goal) of one trajectory, in jit ---------


# --- shared block: offline_goals (identical in every script; tests/test_copies.py) ---
def make_device_dataset(dataset: dict, goal_indices) -> dict:
    """The arrays the jitted sampler reads (goals are precomputed: goal = state[goal_indices])."""
    transition_rows, traj_end = ogbench.index_trajectories(dataset["terminals"])
    return {
        "observations": jnp.asarray(dataset["observations"]),
        "actions": jnp.asarray(dataset["actions"]),
        "goals": jnp.asarray(dataset["observations"][:, np.asarray(goal_indices)]),
        "transition_rows": jnp.asarray(transition_rows),
        "traj_end": jnp.asarray(traj_end),
    }


def sample_indices(data: dict, key, batch_size: int, discount: float):
    """Rows of a batch: t (a transition), t+1, a geometric future goal (P(k) ~ discount^(k-1), k >= 1,
    truncated at the trajectory end) and a uniform future goal (uniform over t+1 .. end). O(batch)."""
    k_row, k_geom, k_unif = jax.random.split(key, 3)
    t = data["transition_rows"][jax.random.randint(k_row, (batch_size,), 0, data["transition_rows"].shape[0])]
    end = data["traj_end"][t]
    u = jax.random.uniform(k_geom, (batch_size,), minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
    offset = 1.0 + jnp.floor(jnp.log(u) / jnp.log(discount))
    value_goal = t + jnp.minimum(offset, (end - t).astype(jnp.float32)).astype(jnp.int32)
    v = jax.random.uniform(k_unif, (batch_size,))
    actor_goal = t + 1 + jnp.minimum(jnp.floor(v * (end - t)).astype(jnp.int32), end - t - 1)
    return t, t + 1, value_goal, actor_goal


# --- end shared block: offline_goals ---


def sample_batch(data: dict, key, batch_size: int, discount: float) -> dict:
    t, t_next, value_goal, actor_goal = sample_indices(data, key, batch_size, discount)
    return {
        "observations": data["observations"][t],
        "actions": data["actions"][t],
        "next_observations": data["observations"][t_next],
        "value_goals": data["goals"][value_goal],
        "actor_goals": data["goals"][actor_goal],
    }


# ---- The jitted epoch ----------------------------------------------------------------------------


def train_epoch(train_state, data, key, update, steps: int, batch_size: int, discount: float):
    """`steps` gradient steps. `data` is an argument, not a closure: closed-over arrays would be baked
    into the program."""

    def step(train_state, k):
        return update(train_state, sample_batch(data, k, batch_size, discount))

    train_state, metrics = jax.lax.scan(step, train_state, jax.random.split(key, steps))
    return train_state, jax.tree_util.tree_map(jnp.mean, metrics)


# ---- Defaults, input checks, the dataset and evaluation, what a checkpoint holds, --dry-run -------


def default_alpha(env_name: str) -> float:
    """OGBench's per-dataset BC weights for its CRL agent."""
    if "explore" in env_name:
        return 0.003
    if env_name.startswith("pointmaze"):
        return 0.03
    return 0.1


def default_discount(env_name: str) -> float:
    return 0.995 if ("giant" in env_name or env_name.startswith("humanoidmaze")) else 0.99


def resolved_logsumexp_coef(args: Args) -> float:
    if args.logsumexp_coef is not None:
        return args.logsumexp_coef
    return 0.0 if args.loss == "binary_nce" else 0.1


def resolved(args: Args) -> dict:
    """The flags whose default depends on the env or the loss, as the run uses them."""
    alpha = default_alpha(args.env) if args.alpha is None else args.alpha
    discount = default_discount(args.env) if args.discount is None else args.discount
    return {"alpha": alpha, "discount": discount, "logsumexp_coef": resolved_logsumexp_coef(args)}


def check_args(args: Args) -> None:
    """Rejects bad input before anything is compiled (one line on stderr, exit code 1)."""
    fail = runkit.fail
    if not args.dataset:
        fail("--dataset PATH.npz is required")
    if not os.path.isfile(args.dataset):
        fail(f"--dataset {args.dataset!r} does not exist")
    if not args.env:
        fail("--env is required (an OGBench env name or one of our envs/ ids)")
    runkit.check_common(args)
    if args.batch_size < 2:
        fail("--batch-size must be at least 2 (the other rows are the negatives)")
    if args.train_steps % args.eval_every:
        fail(f"--train-steps ({args.train_steps}) must be a multiple of --eval-every ({args.eval_every})")
    if args.energy == "mrn" and args.repr_dim % 2:
        fail(f"--energy mrn splits the representation in halves: --repr-dim must be even (got {args.repr_dim})")


def checkpoint_state(train_state: dict, key) -> dict:
    """What a checkpoint holds: the three networks' params, both optimizer states, the key."""
    return {
        "params": {"actor": train_state["actor"], **train_state["critic"]},
        "critic_opt": train_state["critic_opt"],
        "actor_opt": train_state["actor_opt"],
        "key": key,
    }


def train_state_of(saved: dict) -> dict:
    """The inverse of checkpoint_state (without the key)."""
    params = saved["params"]
    return {
        "actor": params["actor"],
        "critic": {"sa_encoder": params["sa_encoder"], "g_encoder": params["g_encoder"]},
        "critic_opt": saved["critic_opt"],
        "actor_opt": saved["actor_opt"],
    }


def build(args: Args, dataset: dict, goal_indices):
    """Networks, losses, the update and the train state's initialiser (key -> train state)."""
    obs_dim, action_dim = dataset["observations"].shape[1], dataset["actions"].shape[1]
    sa_encoder, g_encoder, actor = make_networks(args, action_dim)
    actor_optimizer, critic_optimizer = optax.adam(args.actor_lr), optax.adam(args.critic_lr)
    critic_loss_fn, actor_loss_fn = make_losses(args, sa_encoder, g_encoder, actor, resolved(args)["alpha"])
    update = make_update(critic_loss_fn, actor_loss_fn, critic_optimizer, actor_optimizer)
    nets = (sa_encoder, g_encoder, actor)
    goal_dim, optimizers = len(goal_indices), (actor_optimizer, critic_optimizer)
    init = lambda key: init_train_state(key, *nets, obs_dim, action_dim, goal_dim, *optimizers)
    return nets, (critic_loss_fn, actor_loss_fn), update, init


def compile_epoch(args: Args, update, train_state, data, key):
    """The epoch (`eval_every` gradient steps) as one XLA program, compiled from shapes, the state donated."""
    epoch = partial(
        train_epoch,
        update=update,
        steps=args.eval_every,
        batch_size=args.batch_size,
        discount=resolved(args)["discount"],
    )
    return jax.jit(epoch, donate_argnums=(0,)).lower(*runkit.as_shapes((train_state, data, key))).compile()


def make_validation(args: Args, losses):
    """jit(train state, val data, key) -> the losses on a batch of the -val twin (overfitting: a gap to
    training/)."""
    critic_loss_fn, actor_loss_fn = losses

    @jax.jit
    def validation_metrics(train_state, val_data, key):
        batch = sample_batch(val_data, key, args.batch_size, resolved(args)["discount"])
        return {
            **critic_loss_fn(train_state["critic"], batch)[1],
            **actor_loss_fn(train_state["actor"], train_state["critic"], batch)[1],
        }

    return validation_metrics


def dry_run(args: Args) -> dict:
    """--dry-run: the epoch a real run would compile (from shapes, same donation), its costs printed as
    one JSON line. The dataset is read and checked as in a real run, but kept on the host."""
    runkit.skip_compilation_cache()
    runkit.apply_matmul_precision(args)
    dataset, _, _, goal_indices = ogbench.load_inputs(args.dataset, args.env, args.eval_episode_length, runkit.fail)
    with jax.default_device(jax.devices("cpu")[0]):
        data = runkit.as_shapes(make_device_dataset(dataset, goal_indices))
    _, _, update, init = build(args, dataset, goal_indices)
    key = jax.random.PRNGKey(args.seed)
    train_state = jax.eval_shape(init, key)
    compile_start = time.time()
    compiled = compile_epoch(args, update, train_state, data, key)
    compile_seconds = time.time() - compile_start
    params = {"actor": train_state["actor"], **train_state["critic"]}
    # critic loss: phi(s, a) and psi(g) trained; actor loss: the actor trained, phi(s, mu) passing the
    # gradient to the action, psi(g) forward only
    flops = args.batch_size * (
        runkit.dense_flops(params["sa_encoder"]) * (runkit.PARAM_GRAD + runkit.INPUT_GRAD)
        + runkit.dense_flops(params["g_encoder"]) * (runkit.PARAM_GRAD + runkit.FORWARD)
        + runkit.dense_flops(params["actor"]) * runkit.PARAM_GRAD
    )
    extra = {"sgd_steps_per_epoch": args.eval_every}
    data_bytes = runkit.tree_bytes(data)
    return runkit.dry_run_report(args, SCRIPT, compiled, compile_seconds, params, flops, data_bytes, extra)


# ---- Main: set up, then one host iteration per epoch (train, evaluate, log, checkpoint) ----------

if __name__ == "__main__":
    args = runkit.parse_args(Args, SCRIPT)
    check_args(args)
    runkit.apply_matmul_precision(args)
    if args.dry_run:  # compile, print the costs, exit: no run folder
        dry_run(args)
        sys.exit(0)
    checkpoint = runkit.load_checkpoint(args.resume, SCRIPT) if args.resume else None
    dataset, val_dataset, eval_env, goal_indices = ogbench.load_inputs(
        args.dataset, args.env, args.eval_episode_length, runkit.fail
    )
    run_path = runkit.open_run(args, SCRIPT, {"resolved": resolved(args)})
    runkit.log_backend(SCRIPT)

    # ---- setup: data on device, networks, optimizers, losses, the train state, the compiled epoch ----
    data = make_device_dataset(dataset, goal_indices)
    val_data = make_device_dataset(val_dataset, goal_indices) if val_dataset is not None else None
    (_, _, actor), losses, update, init = build(args, dataset, goal_indices)
    key, k_init = runkit.seed_keys(args.seed, 1, 2)
    train_state = init(k_init)
    start_epoch, train_steps_done, wall_offset = 0, 0, 0.0
    if checkpoint is not None:  # a checkpoint that does not fit fails here, before any compile
        saved = runkit.restore_state(checkpoint_state(train_state, key), checkpoint["state"], args.resume)
        train_state, key = jax.tree_util.tree_map(jnp.asarray, train_state_of(saved)), jnp.asarray(saved["key"])
        start_epoch, train_steps_done, wall_offset = (
            checkpoint["epoch"] + 1,
            checkpoint["env_steps"],
            checkpoint["wall_time"],
        )
    print(
        f"{SCRIPT}: {len(data['transition_rows'])} transitions, {int(dataset['terminals'].sum())} trajectories; "
        f"params critic {runkit.tree_size(train_state['critic'])}, actor {runkit.tree_size(train_state['actor'])}",
        flush=True,
    )
    compile_start = time.time()
    epoch_fn = compile_epoch(args, update, train_state, data, key)
    compile_seconds = time.time() - compile_start
    validation_metrics = make_validation(args, losses)
    act = lambda params, obs, goals: policy_action(actor, params, obs, goals)
    evaluate = ogbench.make_evaluator(args.env, eval_env, act, args.eval_episodes, args.eval_episode_length, args.seed)
    headline = "eval/episode_success" if args.env in envs.ENV_IDS else "eval/success"

    # ---- the loop: one jitted epoch of gradient steps, then evaluate, log, checkpoint ----
    num_epochs = args.train_steps // args.eval_every
    start_time = time.time() - wall_offset
    log = runkit.RunLog(args, SCRIPT, run_path, start_epoch, num_epochs, 1, start_time, compile_seconds)
    for epoch in log.epochs:
        epoch_start = time.time()
        key, k_train, k_val, k_eval = jax.random.split(key, 4)
        train_state, train_metrics = epoch_fn(train_state, data, k_train)
        train_metrics = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
        epoch_seconds = time.time() - epoch_start
        train_steps_done += args.eval_every
        log.check_finite(train_metrics, epoch)
        eval_metrics = evaluate(train_state["actor"], k_eval)
        record = log.record(epoch, train_steps_done, epoch_seconds, args.eval_every, train_metrics, eval_metrics)
        record["train_steps"] = train_steps_done  # offline, env_steps counts gradient steps too
        if val_data is not None:
            val_metrics = jax.device_get(validation_metrics(train_state, val_data, k_val))
            record.update({f"validation/{k}": float(v) for k, v in val_metrics.items()})
        log.log(record, train_steps_done, headline)
        log.checkpoint(checkpoint_state(train_state, key), epoch, train_steps_done, record["wall_time"])
    log.finish(train_steps_done)
