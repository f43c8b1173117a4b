"""Offline contrastive RL (CRL) on OGBench-format datasets, with the paper's residual towers (Sec. 4.6, A.8).

    python offline_crl.py --dataset data/pointmaze-medium-navigate-v0.npz --env pointmaze-medium-navigate-v0
    python offline_crl.py --dataset runs/<online run>/buffer.npz --env reacher     # our own envs/ tasks

The dataset is an OGBench `.npz` (`observations`, `actions`, `terminals`: 1 on the last row of each
trajectory; a `-val.npz` twin beside it is used for validation losses). The critic phi(s, a), psi(g)
is trained with a contrastive loss on (s, a, future goal of the same trajectory); the actor with
DDPG+BC: `-Q / stop_grad(mean |Q|) - alpha * log pi(a_data | s, g)`. Evaluation runs the deterministic
actor on the 5 OGBench tasks of `--env` (a host loop over the gymnasium env, the policy jitted), or
with `envs.evaluate` when `--env` is one of our `envs/` ids.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
import zlib
from functools import partial
from typing import Literal, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass
class Args:
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
    seed: int = 0
    """seed of initialisation, sampling and evaluation"""
    track: bool = False
    """log to wandb (WANDB_MODE=offline works without network)"""
    wandb_project: str = "crl_deep"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user)"""
    run_dir: str = "runs"
    """folder that holds the run folders"""
    run_name: Optional[str] = None
    """run folder name (default: {env}__offline_crl__d{depth}__s{seed}__{unix time})"""
    resume: Optional[str] = None
    """checkpoint.msgpack (or its run folder) of an interrupted run to continue with its own settings (flags
    given again must agree, except --track, --wandb-*)"""
    dry_run: bool = False
    """compile the training epoch from shapes, print its parameters, FLOPs, dataset bytes and XLA's memory
    estimate as one JSON line and exit without a run folder (docs/dry_run.md)"""


SCRIPT = "offline_crl"
COLD_INIT_SCALE = 1e-4  # variance factor of the cold-init head: weights 100x smaller


def is_our_env(name: str) -> bool:
    import envs

    return name in envs.ENV_IDS


def default_alpha(env_name: str) -> float:
    """OGBench's per-dataset BC weights for its CRL agent."""
    if "explore" in env_name:
        return 0.003
    if env_name.startswith("pointmaze"):
        return 0.03
    return 0.1


def resolved_logsumexp_coef(args: Args) -> float:
    if args.logsumexp_coef is not None:
        return args.logsumexp_coef
    return 0.0 if args.loss == "binary_nce" else 0.1


def default_discount(env_name: str) -> float:
    return 0.995 if ("giant" in env_name or env_name.startswith("humanoidmaze")) else 0.99


def check_args(args: Args) -> None:
    """Rejects bad input before anything is compiled (one line on stderr, exit code 1)."""
    if not args.dataset:
        fail("--dataset PATH.npz is required")
    if not os.path.isfile(args.dataset):
        fail(f"--dataset {args.dataset!r} does not exist")
    if not args.env:
        fail("--env is required (an OGBench env name or one of our envs/ ids)")
    check_common(args)
    if args.batch_size < 2:
        fail("--batch-size must be at least 2 (the other rows are the negatives)")
    if args.train_steps % args.eval_every:
        fail(f"--train-steps ({args.train_steps}) must be a multiple of --eval-every ({args.eval_every})")
    if args.energy == "mrn" and args.repr_dim % 2:
        fail(f"--energy mrn splits the representation in halves: --repr-dim must be even (got {args.repr_dim})")


# ----------------------------------------------------------------------------------------------------
# Dataset: OGBench npz -> trajectory index; (s, a, s', geometric goal, uniform goal) sampled in jit
# ----------------------------------------------------------------------------------------------------
def load_dataset(path: str) -> dict:
    """Reads an OGBench-format npz and checks it. Rows after the last terminal (an unfinished
    trajectory) are dropped. Raises ValueError with one clear line on a bad file."""
    try:
        with np.load(path) as f:
            raw = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in ("observations", "actions", "terminals") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; an OGBench dataset has observations, actions, terminals")
    obs, actions, terminals = raw["observations"], raw["actions"], raw["terminals"]
    if obs.ndim != 2 or actions.ndim != 2 or terminals.ndim != 1:
        raise ValueError(
            f"{path}: expected observations [N, D], actions [N, A], terminals [N]; got shapes "
            f"{obs.shape}, {actions.shape}, {terminals.shape}"
        )
    lengths = {"observations": len(obs), "actions": len(actions), "terminals": len(terminals)}
    for k in ("qpos", "qvel"):
        if k in raw:
            lengths[k] = len(raw[k])
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: mismatched lengths {lengths}")
    for k in ("observations", "actions"):
        if not np.issubdtype(raw[k].dtype, np.number) or not np.all(np.isfinite(raw[k])):
            raise ValueError(f"{path}: {k} contain NaN/inf or non-numbers")
    if not np.all((terminals == 0) | (terminals == 1)):
        raise ValueError(f"{path}: terminals must be 0 or 1")
    ends = np.flatnonzero(terminals)
    if len(ends) == 0 or np.max(np.diff(np.concatenate([[-1], ends]))) < 2:
        raise ValueError(f"{path}: no complete trajectory (a terminal row after at least one transition)")
    n = ends[-1] + 1
    return {
        "observations": obs[:n].astype(np.float32),
        "actions": actions[:n].astype(np.float32),
        "terminals": terminals[:n].astype(np.float32),
    }


def index_trajectories(terminals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(transition_rows, traj_end). A trajectory is the rows up to and including a terminal row; row t
    is a transition (s_t, a_t, s_{t+1}) unless it is a terminal row. traj_end[t] is the last row of t's
    trajectory: future goals of t are rows t+1 .. traj_end[t]."""
    ends = np.flatnonzero(terminals)
    traj_end = ends[np.searchsorted(ends, np.arange(len(terminals)))]
    transition_rows = np.flatnonzero(terminals == 0)
    return transition_rows.astype(np.int32), traj_end.astype(np.int32)


def make_device_dataset(dataset: dict, goal_indices: np.ndarray) -> dict:
    """The arrays the jitted sampler reads (goals are precomputed: goal = state[goal_indices])."""
    transition_rows, traj_end = index_trajectories(dataset["terminals"])
    return {
        "observations": jnp.asarray(dataset["observations"]),
        "actions": jnp.asarray(dataset["actions"]),
        "goals": jnp.asarray(dataset["observations"][:, goal_indices]),
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


def sample_batch(data: dict, key, batch_size: int, discount: float) -> dict:
    t, t_next, value_goal, actor_goal = sample_indices(data, key, batch_size, discount)
    return {
        "observations": data["observations"][t],
        "actions": data["actions"][t],
        "next_observations": data["observations"][t_next],
        "value_goals": data["goals"][value_goal],
        "actor_goals": data["goals"][actor_goal],
    }


# ----------------------------------------------------------------------------------------------------
# Networks: the paper's residual tower (lecun-uniform Dense, LayerNorm, swish; blocks of 4 with a skip)
# ----------------------------------------------------------------------------------------------------
# --- shared block: tower (identical in every script; tests/test_copies.py) ---
# The paper's residual network. Every Dense: variance scaling 1/3, fan_in, uniform (the paper code's
# "lecun_uniform"), bias 0.
kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def activation_fn(name: str):
    return {"swish": nn.swish, "relu": nn.relu}[name]


def layer_norm_dtype(dense_dtype):
    """LayerNorm's output dtype: inferred as always when the Dense layers compute in float32 (dense_dtype
    None); float32 when they compute in bfloat16, so its statistics and the residual stream stay float32."""
    return None if dense_dtype is None else jnp.float32


class ResidualBlock(nn.Module):
    """4 x [Dense -> LayerNorm -> activation], then add the block input (nothing after the add).

    Called as a scan body: (carry, unused) -> (carry, None). When the 'intermediates' collection is
    mutable it records the mean L2 norm of the residual branch (before the add); otherwise the norm
    is not even traced, so it costs nothing.
    """

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
            h = activation_fn(self.activation)(h)
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "residual_norm", jnp.mean(jnp.linalg.norm(h, axis=-1)))
        return x + h, None


class Tower(nn.Module):
    """Input Dense(width) -> LN -> act, then depth/4 residual blocks scanned over stacked params.

    dtype: the compute dtype of every Dense of the tower (jnp.bfloat16 with --matmul-precision bfloat16:
    inputs and kernels cast to it, the parameters and the optimizer state stay float32); LayerNorm, the
    residual stream and the output stay float32. None builds exactly the float32 tower."""

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
        x = activation_fn(self.activation)(x)
        if self.dtype is not None:  # without LayerNorm the activation is still bfloat16
            x = x.astype(jnp.float32)
        # Backward-pass memory: from two blocks up, by default keep only the matmul outputs of each
        # block and recompute LayerNorm/swish from them (cheap elementwise work; on CPU faster from
        # depth 16 up than saving every intermediate, which the scan must stack per block). A single
        # block (depth 4) stacks nothing, so it saves everything. --remat keeps only the block input and
        # recomputes the whole block (one extra forward pass, least memory).
        if self.remat:
            block = nn.remat(ResidualBlock, prevent_cse=False)
        elif self.depth > 4:
            block = nn.remat(ResidualBlock, prevent_cse=False, policy=jax.checkpoint_policies.checkpoint_dots)
        else:
            block = ResidualBlock
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            length=self.depth // 4,
            unroll=self.scan_unroll,
        )
        x, _ = blocks(self.width, self.layer_norm, self.activation, self.dtype, name="blocks")(x, None)
        return x


def make_tower(args, depth: int) -> Tower:
    """A tower of `depth` built as the flags say (--width, --layer-norm, --activation, --remat, --scan-unroll,
    --matmul-precision)."""
    dtype = jnp.bfloat16 if args.matmul_precision == "bfloat16" else None
    return Tower(depth, args.width, args.layer_norm, args.activation, args.remat, args.scan_unroll, dtype)


def apply_matmul_precision(args):
    """--matmul-precision float32: jax computes every float32 matmul of the process in full float32 (its
    default on NVIDIA Ampere/Hopper GPUs is TensorFloat32; on CPU it is float32 anyway). Called once the
    args are checked, before the networks are traced. "default" and "bfloat16" leave jax's setting alone
    (bfloat16 is the towers' Dense dtype, see make_tower)."""
    if args.matmul_precision == "float32":
        jax.config.update("jax_default_matmul_precision", "float32")


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


# ----------------------------------------------------------------------------------------------------
# Energies and losses
# ----------------------------------------------------------------------------------------------------
# --- shared block: energies (identical in every script; tests/test_copies.py) ---
SQRT_EPS = 1e-6  # inside every square root: finite gradients at zero distance and zero norm


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


# --- end shared block: energies ---


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


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------------------------------
# Evaluation: OGBench envs in a host loop (batched episodes, jitted policy); envs/ ids with envs.evaluate
# ----------------------------------------------------------------------------------------------------
def make_ogbench_env(name: str, episode_length: Optional[int]):
    import ogbench

    kwargs = {} if episode_length is None else {"max_episode_steps": episode_length}
    return ogbench.make_env_and_datasets(name, env_only=True, **kwargs)


def evaluate_ogbench(eval_envs, act, seed: int) -> dict:
    """Success rate per task (OGBench's evaluation tasks, ids 1..5), one episode per env in `eval_envs`
    run in lockstep; an episode succeeds if info['success'] is 1 at any step. Seeds are fixed, so
    every evaluation of a run sees the same start noise."""
    metrics, all_success, all_length = {}, [], []
    for task in range(1, len(eval_envs[0].unwrapped.task_infos) + 1):
        obs, goals = [], []
        for i, env in enumerate(eval_envs):
            ob, info = env.reset(seed=seed * 100_000 + task * 1000 + i, options={"task_id": task})
            obs.append(ob)
            goals.append(info["goal"])
        obs, goals = np.asarray(obs, np.float32), np.asarray(goals, np.float32)
        active = np.ones(len(eval_envs), bool)
        success = np.zeros(len(eval_envs))
        length = np.zeros(len(eval_envs))
        while active.any():
            actions = np.asarray(act(obs, goals))
            for i in np.flatnonzero(active):
                ob, _, terminated, truncated, info = eval_envs[i].step(actions[i])
                obs[i] = ob
                length[i] += 1
                success[i] = max(success[i], float(info["success"]))
                active[i] = not (terminated or truncated)
        metrics[f"task{task}_success"] = float(success.mean())
        all_success.append(success.mean())
        all_length.append(length.mean())
    metrics["success"] = float(np.mean(all_success))
    metrics["episode_length"] = float(np.mean(all_length))
    return metrics


# ----------------------------------------------------------------------------------------------------
# The update, the jitted epoch, evaluation setup
# ----------------------------------------------------------------------------------------------------
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


def train_epoch(train_state, data, key, update, steps: int, batch_size: int, discount: float):
    """`steps` gradient steps. `data` is an argument, not a closure: closed-over arrays would be baked
    into the program."""

    def step(train_state, k):
        return update(train_state, sample_batch(data, k, batch_size, discount))

    train_state, metrics = jax.lax.scan(step, train_state, jax.random.split(key, steps))
    return train_state, jax.tree_util.tree_map(jnp.mean, metrics)


def load_inputs(args: Args):
    """The dataset, its -val twin (or None), the goal indices and the evaluation env (one of our envs/
    or a first OGBench env), all checked against each other before anything compiles."""
    try:
        dataset = load_dataset(args.dataset)
        val_path = args.dataset[: -len(".npz")] + "-val.npz" if args.dataset.endswith(".npz") else ""
        val_dataset = load_dataset(val_path) if os.path.isfile(val_path) else None
    except ValueError as e:
        fail(str(e))
    obs_dim, action_dim = dataset["observations"].shape[1], dataset["actions"].shape[1]
    if is_our_env(args.env):
        import envs

        eval_env = envs.make(envs.eval_variant(args.env))
        env_sizes, goal_indices = (eval_env.state_dim, eval_env.action_size), np.asarray(eval_env.goal_indices)
    else:
        try:
            eval_env = make_ogbench_env(args.env, args.eval_episode_length)
        except Exception as e:  # gymnasium raises several types for unknown names
            fail(f"--env {args.env!r} is neither one of our envs/ ids nor an OGBench env ({e})")
        env_sizes = (eval_env.observation_space.shape[0], eval_env.action_space.shape[0])
        goal_indices = np.arange(obs_dim)  # OGBench goals are full observations
    if env_sizes != (obs_dim, action_dim):
        fail(
            f"dataset has observations of size {obs_dim} and actions of size {action_dim}; env {args.env!r} "
            f"has {env_sizes[0]} and {env_sizes[1]}"
        )
    if val_dataset is not None and (val_dataset["observations"].shape[1], val_dataset["actions"].shape[1]) != env_sizes:
        fail(f"{val_path}: observation/action sizes differ from {args.dataset}")
    return dataset, val_dataset, goal_indices, eval_env


def make_evaluator(args: Args, actor, eval_env):
    """(actor_params, key) -> eval metrics: envs.evaluate for our envs, OGBench's 5 tasks otherwise."""
    if is_our_env(args.env):
        import envs

        state_dim = eval_env.state_dim
        return jax.jit(
            lambda params, key: envs.evaluate(
                eval_env,
                lambda obs: policy_action(actor, params, obs[:, :state_dim], obs[:, state_dim:]),
                key,
                args.eval_episodes,
                args.eval_episode_length or 1000,
            )
        )
    eval_envs = [eval_env] + [
        make_ogbench_env(args.env, args.eval_episode_length) for _ in range(args.eval_episodes - 1)
    ]
    policy = jax.jit(lambda params, obs, goals: policy_action(actor, params, obs, goals))
    return lambda params, key: evaluate_ogbench(eval_envs, lambda o, g: policy(params, o, g), args.seed)


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


# --- shared block: scaffold (identical in every script; tests/test_copies.py) ---
# The host side of a run: bad-input errors, the run folder (config.json, metrics.jsonl, summary.json,
# checkpoint.msgpack), --resume, wandb and the progress bar. Each script defines SCRIPT and Args.
# Only process 0 writes files and logs (jax.process_index(), for multi-process runs).
CHECKPOINT_FILE = "checkpoint.msgpack"
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "deep-crl checkpoint", 1
# free on --resume; --dry-run plans the resumed run (its own args) and writes nothing
RUN_FLAGS = ("track", "wandb_project", "wandb_entity", "run_dir", "run_name", "resume", "dry_run")
POSITIVE_FLAGS = (
    "width",
    "repr_dim",
    "batch_size",
    "num_envs",
    "num_eval_envs",
    "episode_length",
    "num_epochs",
    "unroll_length",
    "sgd_steps_per_train_step",
    "replay_size",
    "min_replay_size",
    "scan_unroll",
    "train_steps",
    "eval_every",
    "eval_episodes",
    "eval_episode_length",
    "policy_delay",
    "num_seeds",
)
NON_NEGATIVE_FLAGS = ("logsumexp_coef", "alpha", "target_noise", "target_noise_clip", "exploration_noise")


def fail(message: str):
    """Bad input: stops with one line "error: ..." on stderr (exit code 1), before anything is compiled."""
    raise SystemExit(f"error: {message}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_common(args):
    """The range checks every script shares, by flag name (each Args has a subset of these flags)."""
    config = dataclasses.asdict(args)
    for name in ("depth", "actor_depth", "critic_depth"):
        value = config.get(name)
        if value is not None and (value <= 0 or value % 4):
            fail(f"{flag(name)} must be a positive multiple of 4 (got {value})")
    for name, value in config.items():
        if value is None or isinstance(value, (str, bool)):
            continue
        if (name in POSITIVE_FLAGS or name.endswith("_lr") or name == "learning_rate") and not value > 0:
            fail(f"{flag(name)} must be positive (got {value})")
        if name in NON_NEGATIVE_FLAGS and not value >= 0:
            fail(f"{flag(name)} must be non-negative (got {value})")
        if name == "discount" and not 0.0 < value < 1.0:
            fail(f"--discount must be in (0, 1) (got {value})")
        if name == "tau" and not 0.0 < value <= 1.0:
            fail(f"--tau must be in (0, 1] (got {value})")
        if name == "her_ratio" and not 0.0 <= value <= 1.0:
            fail(f"--her-ratio must be in [0, 1] (got {value})")
    if "replay_size" in config and config.get("mode", "online") == "online":
        if args.min_replay_size > args.replay_size:
            fail(f"--min-replay-size {args.min_replay_size} exceeds --replay-size {args.replay_size} (steps per env)")
        if args.unroll_length > args.replay_size:
            fail(f"--unroll-length {args.unroll_length} exceeds --replay-size {args.replay_size} (steps per env)")
        if args.unroll_length > args.episode_length:
            fail(f"--unroll-length {args.unroll_length} exceeds --episode-length {args.episode_length}")
        if args.batch_size > args.num_envs * args.min_replay_size:
            fail(
                f"--batch-size {args.batch_size} is larger than the buffer holds when training starts "
                f"(num-envs x min-replay-size = {args.num_envs * args.min_replay_size})"
            )


def write_atomic(path: str, data: bytes):
    """Never a partial file at `path`: write a temp file, fsync it, rename it over, fsync the folder."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def to_numpy(tree):
    """Host copies of a tree of arrays. In a multi-process run every process must call it: arrays
    split over processes are gathered first."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def versions() -> dict:
    from importlib import metadata

    out = {name: metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax", "brax", "mujoco")}
    out["python"] = sys.version.split()[0]
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv=None):
    """Args from the command line. With --resume RUN: the run's own args; flags given again must
    agree with them, except RUN_FLAGS (e.g. --track), which apply and are listed on stderr."""
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    args = tyro.cli(Args, args=argv)
    if args.resume is None:
        return args
    header, _ = read_checkpoint(args.resume, header_only=True)
    fields = {f.name for f in dataclasses.fields(Args)}
    unknown = sorted(set(header["args"]) - fields)
    if unknown:
        fail(f"{checkpoint_path(args.resume)}: the run has flags this {SCRIPT}.py lacks: {', '.join(unknown)}")
    saved = Args(**header["args"])
    given = {name for name in fields for a in argv if a.split("=")[0] in (flag(name), "--no-" + flag(name)[2:])}
    changed = sorted(name for name in given if getattr(args, name) != getattr(saved, name))
    conflicts = [
        f"{flag(n)} {getattr(args, n)!r} (the run has {getattr(saved, n)!r})" for n in changed if n not in RUN_FLAGS
    ]
    if conflicts:
        fail(f"--resume {args.resume}: a resumed run keeps its settings; drop {'; '.join(conflicts)}")
    applied = [n for n in changed if n != "resume"]
    if applied:
        print(
            "resume: " + ", ".join(f"{flag(n)} {getattr(args, n)!r} (was {getattr(saved, n)!r})" for n in applied),
            file=sys.stderr,
        )
    return dataclasses.replace(saved, **{n: getattr(args, n) for n in applied}, resume=args.resume)


def open_run(args, extra_config: Optional[dict] = None) -> str:
    """The run folder: the --resume one, or a new one holding config.json."""
    if args.resume is not None:
        return os.path.dirname(os.path.abspath(checkpoint_path(args.resume)))
    name = args.run_name or f"{args.env}__{SCRIPT}__d{args.depth}__s{args.seed}__{int(time.time())}"
    path = os.path.join(args.run_dir, name)
    if any(os.path.exists(os.path.join(path, f)) for f in (CHECKPOINT_FILE, "checkpoint.pkl")):
        fail(f"{path} already holds a run; use --resume {path}")
    if jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        config = {
            "script": SCRIPT,
            "args": dataclasses.asdict(args),
            **(extra_config or {}),
            "versions": versions(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "git_commit": git_commit(),
        }
        write_atomic(os.path.join(path, "config.json"), json.dumps(config, indent=2).encode())
    return path


def checkpoint_path(path: str) -> str:
    return os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path


def read_checkpoint(path: str, header_only: bool = False):
    """(header, payload bytes) of a checkpoint file or run folder; one line naming the file if it is
    missing, truncated, garbage, of an old format or written by another script."""
    file = checkpoint_path(path)
    old = os.path.join(path, "checkpoint.pkl")
    if not os.path.isfile(file):
        if os.path.isfile(old):
            fail(f"{old}: an old-format (pickle) checkpoint; this {SCRIPT}.py reads only {CHECKPOINT_FILE}")
        fail(f"{file}: no checkpoint there")
    with open(file, "rb") as f:
        first_line = f.readline(1 << 20)
        payload = b"" if header_only else f.read()
    if first_line.startswith(b"\x80"):
        fail(f"{file}: an old-format (pickle) checkpoint, not loaded (pickles can run code)")
    try:
        header = json.loads(first_line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        fail(f"{file}: not a {CHECKPOINT_FILE} (no '{CHECKPOINT_FORMAT}' header line)")
    if header.get("version") != CHECKPOINT_VERSION:
        fail(f"{file}: checkpoint format version {header.get('version')}; this {SCRIPT}.py reads {CHECKPOINT_VERSION}")
    if header.get("script") != SCRIPT:
        fail(f"{file}: written by {header.get('script')}.py, not by {SCRIPT}.py")
    if not header_only and len(payload) != header["payload_bytes"]:
        fail(f"{file}: truncated ({len(payload)} of {header['payload_bytes']} payload bytes)")
    if not header_only and zlib.crc32(payload) != header["payload_crc32"]:
        fail(f"{file}: corrupted (payload checksum mismatch)")
    return header, payload


def save_checkpoint(run_path: str, args, state: dict, epoch: int, env_steps: int, wall_time: float):
    """checkpoint.msgpack: one JSON header line (who wrote it, env, architecture, progress), then
    `state` (a dict with the network "params" and whatever a resume needs) as flax msgpack. Every
    process calls it (to_numpy gathers); process 0 writes."""
    state = to_numpy(state)
    if jax.process_index() != 0:
        return
    payload = flax.serialization.msgpack_serialize(nested_dict(state))
    config = dataclasses.asdict(args)
    header = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "script": SCRIPT,
        "env": args.env,
        "depths": {k: v for k, v in config.items() if k.endswith("depth")},
        "widths": {k: v for k, v in config.items() if k in ("width", "repr_dim")},
        "seed": args.seed,
        "epoch": epoch,
        "env_steps": env_steps,
        "wall_time": wall_time,
        "args": config,
        "payload_bytes": len(payload),
        "payload_crc32": zlib.crc32(payload),
    }
    write_atomic(os.path.join(run_path, CHECKPOINT_FILE), json.dumps(header).encode() + b"\n" + payload)


def load_checkpoint(path: str) -> dict:
    """A checkpoint (file or run folder) as {"header", "args", "epoch", "env_steps", "wall_time",
    "params", "state"}: "state" is everything saved (nested dicts of numpy arrays), "params" its
    network parameters. Stops with one line if the file is not a good checkpoint of this script."""
    header, payload = read_checkpoint(path)
    try:
        state = flax.serialization.msgpack_restore(payload)
    except Exception as e:  # msgpack raises several types on a bad payload
        fail(f"{checkpoint_path(path)}: unreadable payload ({type(e).__name__})")
    return {
        "header": header,
        "args": header["args"],
        "epoch": header["epoch"],
        "env_steps": header["env_steps"],
        "wall_time": header["wall_time"],
        "params": state["params"],
        "state": state,
    }


def _key_name(key) -> str:
    """A pytree key path entry (dict key, dataclass field, sequence index) as a msgpack map key."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def nested_dict(tree) -> dict:
    """Any pytree as nested dicts of its leaves, keyed by dict key, field name or index: the form flax
    msgpack writes. Unlike flax's to_state_dict it also walks pytrees flax does not know (MJX's Data
    inside the arm envs' states)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        for key in path[:-1]:
            node = node.setdefault(_key_name(key), {})
        node[_key_name(path[-1])] = leaf
    return out


def restore_state(template, saved: dict, path: str):
    """The saved state in the structure of `template` (arrays or shapes); one line if they differ."""
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for key_path, like in paths_and_leaves:
        node = saved
        for key in key_path:
            if not isinstance(node, dict) or _key_name(key) not in node:
                where = jax.tree_util.keystr(key_path)
                fail(f"{checkpoint_path(path)}: its state does not fit this configuration (no {where})")
            node = node[_key_name(key)]
        if np.shape(node) != np.shape(like):
            fail(f"{checkpoint_path(path)}: its arrays' shapes do not fit this configuration")
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class RunLog:
    """metrics.jsonl (a line per epoch, a summary line at the end), summary.json, wandb, progress bar.

    With --num-seeds N > 1 (crl_deep): a line per epoch and seed (a `seed` field), a wandb run per seed
    in one group, and a summary of each seed and of their mean and std. On --resume, lines of epochs
    after the checkpoint's are dropped first."""

    def __init__(self, args, run_path: str, start_epoch: int, num_epochs: int):
        self.args, self.run_path = args, run_path
        self.path = os.path.join(run_path, "metrics.jsonl")
        self.writer = jax.process_index() == 0
        num_seeds = getattr(args, "num_seeds", 1)
        self.seeds = [args.seed + i for i in range(num_seeds)] if num_seeds > 1 else [None]  # None: no seed field
        lines = []
        if args.resume is not None and os.path.isfile(self.path):
            with open(self.path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            lines = [m for m in lines if not m.get("summary") and m["epoch"] < start_epoch]
            if self.writer:
                write_atomic(self.path, "".join(json.dumps(m) + "\n" for m in lines).encode())
        self.eval_history = {seed: [] for seed in self.seeds}  # per seed: the eval metrics of each epoch
        for m in lines:
            self.eval_history[m.get("seed")].append({k: v for k, v in m.items() if k.startswith("eval/")})
        run_name = os.path.basename(os.path.normpath(run_path))
        self.wandb = {}  # seed -> wandb run
        if args.track and self.writer:
            import wandb

            for seed in self.seeds:
                name = run_name if seed is None else f"{run_name}__s{seed}"
                several = {} if seed is None else {"group": run_name, "reinit": "create_new"}
                self.wandb[seed] = wandb.init(
                    project=args.wandb_project,
                    entity=args.wandb_entity,
                    name=name,
                    id=re.sub(r"[^A-Za-z0-9_-]", "-", name)[-64:],  # wandb ids allow only these
                    resume="allow",
                    config={**dataclasses.asdict(args), **({} if seed is None else {"seed": seed})},
                    **several,
                )
        from tqdm import tqdm

        self.epochs = tqdm(
            range(start_epoch, num_epochs),
            initial=start_epoch,
            total=num_epochs,
            desc=run_name,
            dynamic_ncols=True,
            disable=not self.writer,
        )

    def check_finite(self, train_metrics: dict, epoch: int, seed: Optional[int] = None):
        """Stops on a non-finite loss, before this epoch's checkpoint: the last good one stays."""
        bad = [k for k, v in train_metrics.items() if k.endswith("loss") and not math.isfinite(v)]
        if bad:
            self.epochs.close()
            file = os.path.join(self.run_path, CHECKPOINT_FILE)
            last_good = (
                f"the last good checkpoint is {file} (epoch {read_checkpoint(file, True)[0]['epoch']})"
                if os.path.isfile(file)
                else "no checkpoint was written yet"
            )
            where = f"epoch {epoch}" if seed is None else f"epoch {epoch} of seed {seed}"
            fail(f"non-finite {', '.join(bad)} in {where}; stopped, {last_good}")

    def log(self, records, step: int, headline: str):
        """Appends the epoch's record (a list of them, one per seed, with --num-seeds), sends each to
        wandb at `step`, shows the sps and `headline` (the mean over seeds) on the bar."""
        records = [records] if isinstance(records, dict) else records
        for record in records:
            self.eval_history[record.get("seed")].append({k: v for k, v in record.items() if k.startswith("eval/")})
        if self.writer:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in records))
        for record in records:
            if record.get("seed") in self.wandb:
                self.wandb[record.get("seed")].log(record, step=step)
        head = float(np.mean([record[headline] for record in records]))
        self.epochs.set_postfix({"sps": f"{records[0]['sps']:.0f}", headline: f"{head:.3g}"})

    def finish(self, env_steps: int) -> dict:
        """The summary: the mean of the last 5 evaluations of every eval metric (suffix _last5). With
        several seeds: each seed's under "seeds" (by seed), their mean as `<metric>_last5` and their
        population std as `<metric>_last5_std`."""
        last5 = {seed: history[-5:] for seed, history in self.eval_history.items()}
        per_seed = {
            seed: {f"{k}_last5": float(np.mean([m[k] for m in tail])) for k in (tail[0] if tail else {})}
            for seed, tail in last5.items()
        }
        summary = {
            "summary": True,
            "epochs": len(self.eval_history[self.seeds[0]]),
            "env_steps": env_steps,
        }
        if self.seeds == [None]:
            summary.update(per_seed[None])
        else:
            keys = per_seed[self.seeds[0]]
            summary["num_seeds"] = len(self.seeds)
            summary.update({k: float(np.mean([per_seed[s][k] for s in self.seeds])) for k in keys})
            summary.update({f"{k}_std": float(np.std([per_seed[s][k] for s in self.seeds])) for k in keys})
            summary["seeds"] = {str(s): per_seed[s] for s in self.seeds}
        if self.writer:
            with open(self.path, "a") as f:
                f.write(json.dumps(summary) + "\n")
            write_atomic(os.path.join(self.run_path, "summary.json"), json.dumps(summary, indent=2).encode())
            print(json.dumps(summary))
        for seed, run in self.wandb.items():
            run.summary.update(summary if seed is None else {**per_seed[seed], "env_steps": env_steps})
            run.finish()
        return summary


# --- end shared block: scaffold ---


# --- shared block: dry_run (identical in every script; tests/test_copies.py) ---
# --dry-run: what a configuration will cost, before it runs. The script builds its training state from
# shapes alone (jax.eval_shape: no parameter is drawn, no env is stepped), AOT-compiles the epoch
# function a real run would use (same donation, same shardings) and passes the compiled program here;
# dry_run_report prints one JSON line. Nothing is written to disk (no run folder, no wandb).
#
# FLOPs per SGD step count the Dense layers only: a forward pass of one example through a Dense of
# kernel [in, out] costs 2 * in * out (a multiply and an add per weight). A pass whose parameters get
# gradients costs 3x its forward (forward, backward to the inputs, backward to the weights), a pass
# through a frozen network that only carries gradients to its input (e.g. the critic under the actor's
# loss) 2x, a forward-only pass (targets, stop_gradient inputs) 1x. Not counted: biases, LayerNorm,
# activations, the losses (e.g. the batch x batch logits), and the recomputation of --remat (one more
# forward of the residual blocks per differentiated pass).
FORWARD, INPUT_GRAD, PARAM_GRAD = 1, 2, 3  # multiples of a pass's forward FLOPs, as above
MEMORY_FIELDS = ("argument", "output", "temp", "generated_code", "alias")


def skip_compilation_cache():
    """Compile afresh even where JAX_COMPILATION_CACHE_DIR is set: an executable read back from the
    persistent cache reports no aliased (donated) bytes, and its compile time is not one. jax decides
    once per process whether it uses the cache, so that decision is reset too (a program compiled
    before this call, e.g. while building an env, has already made it)."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()


def tree_size(tree) -> int:
    """Elements of a pytree of arrays or jax.ShapeDtypeStructs (parameters, for a params tree)."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays or jax.ShapeDtypeStructs."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def as_shapes(tree):
    """jax.ShapeDtypeStructs of a pytree of arrays (host or device): what AOT lowering needs."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def dense_flops(params) -> int:
    """Forward FLOPs of ONE example through every Dense kernel in `params`: 2 x the kernels' elements.
    Stacked kernels count every copy: the scanned residual blocks [depth/4, in, out], twin critics [2, ...]."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return 2 * sum(math.prod(x.shape) for path, x in flat if getattr(path[-1], "key", None) == "kernel")


def dry_run_report(
    args, compiled, compile_seconds: float, params: dict, flops_per_sgd_step: int, buffer_bytes: int, extra=None
) -> dict:
    """The one JSON line of --dry-run, printed to stdout and returned.

    args: the run's Args (all go into the line); compiled: the epoch's `jax.jit(...).lower(...).compile()`;
    params: {network name: its params (or shapes)}; buffer_bytes: the replay buffer or the dataset the
    epoch reads. The memory figures are
    XLA's own for this program on this backend, per device: arguments (the whole carry: train state,
    buffer, env states), outputs, temporaries, generated code, and the outputs that alias donated
    arguments. peak_bytes = arguments + outputs - aliased + temporaries (donated buffers are updated in
    place, so they count once); the generated code is left out (it is host memory on CPU)."""
    stats = compiled.memory_analysis()
    memory = {
        f"{name}_bytes": None if stats is None else int(getattr(stats, f"{name}_size_in_bytes"))
        for name in MEMORY_FIELDS
    }
    peak = None
    if stats is not None:
        peak = memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"] + memory["temp_bytes"]
    report = {
        "script": SCRIPT,
        "params": {name: tree_size(tree) for name, tree in params.items()},
        "params_total": sum(tree_size(tree) for tree in params.values()),
        "flops_per_sgd_step": int(flops_per_sgd_step),
        "buffer_bytes": int(buffer_bytes),
        "memory": memory,
        "peak_bytes": peak,
        "peak_gib": None if peak is None else round(peak / 2**30, 3),
        "compile_seconds": round(compile_seconds, 3),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **(extra or {}),
        "args": dataclasses.asdict(args),
    }
    print(json.dumps(report), flush=True)
    return report


# --- end shared block: dry_run ---


def dry_run(args: Args) -> dict:
    """--dry-run: the epoch a real run would compile (from shapes, same donation), its costs printed as
    one JSON line (dry_run_report). The dataset is read and checked as in a real run, but kept on the host."""
    skip_compilation_cache()
    apply_matmul_precision(args)
    dataset, _, goal_indices, _ = load_inputs(args)
    alpha = default_alpha(args.env) if args.alpha is None else args.alpha
    discount = default_discount(args.env) if args.discount is None else args.discount
    with jax.default_device(jax.devices("cpu")[0]):
        data = as_shapes(make_device_dataset(dataset, goal_indices))
    obs_dim, action_dim = dataset["observations"].shape[1], dataset["actions"].shape[1]
    sa_encoder, g_encoder, actor = make_networks(args, action_dim)
    actor_optimizer, critic_optimizer = optax.adam(args.actor_lr), optax.adam(args.critic_lr)
    critic_loss_fn, actor_loss_fn = make_losses(args, sa_encoder, g_encoder, actor, alpha)
    key = jax.random.PRNGKey(args.seed)
    train_state = jax.eval_shape(
        lambda k: init_train_state(
            k, sa_encoder, g_encoder, actor, obs_dim, action_dim, len(goal_indices), actor_optimizer, critic_optimizer
        ),
        key,
    )
    update = make_update(critic_loss_fn, actor_loss_fn, critic_optimizer, actor_optimizer)
    epoch_fn = jax.jit(
        partial(train_epoch, update=update, steps=args.eval_every, batch_size=args.batch_size, discount=discount),
        donate_argnums=(0,),
    )
    compile_start = time.time()
    compiled = epoch_fn.lower(train_state, data, as_shapes(key)).compile()
    compile_seconds = time.time() - compile_start
    params = {"actor": train_state["actor"], **train_state["critic"]}
    # critic loss: phi(s, a) and psi(g) trained; actor loss: the actor trained, phi(s, mu) passing the
    # gradient to the action, psi(g) forward only
    flops = args.batch_size * (
        dense_flops(params["sa_encoder"]) * (PARAM_GRAD + INPUT_GRAD)
        + dense_flops(params["g_encoder"]) * (PARAM_GRAD + FORWARD)
        + dense_flops(params["actor"]) * PARAM_GRAD
    )
    extra = {"sgd_steps_per_epoch": args.eval_every}
    return dry_run_report(args, compiled, compile_seconds, params, flops, tree_bytes(data), extra)


# ----------------------------------------------------------------------------------------------------
# Main: set up, then one host iteration per epoch (train, evaluate, log, checkpoint)
# ----------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    args = parse_args()
    check_args(args)
    apply_matmul_precision(args)
    if args.dry_run:  # compile, print the costs, exit: no run folder
        dry_run(args)
        sys.exit(0)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    dataset, val_dataset, goal_indices, eval_env = load_inputs(args)
    alpha = default_alpha(args.env) if args.alpha is None else args.alpha
    discount = default_discount(args.env) if args.discount is None else args.discount
    run_path = open_run(
        args, {"resolved": {"alpha": alpha, "discount": discount, "logsumexp_coef": resolved_logsumexp_coef(args)}}
    )

    # ---- setup: data on device, networks, optimizers, losses, the train state, jitted functions ----
    data = make_device_dataset(dataset, goal_indices)
    val_data = make_device_dataset(val_dataset, goal_indices) if val_dataset is not None else None
    obs_dim, action_dim = dataset["observations"].shape[1], dataset["actions"].shape[1]
    sa_encoder, g_encoder, actor = make_networks(args, action_dim)
    actor_optimizer, critic_optimizer = optax.adam(args.actor_lr), optax.adam(args.critic_lr)
    critic_loss_fn, actor_loss_fn = make_losses(args, sa_encoder, g_encoder, actor, alpha)
    key, k_init = jax.random.split(jax.random.PRNGKey(args.seed))
    train_state = init_train_state(
        k_init, sa_encoder, g_encoder, actor, obs_dim, action_dim, len(goal_indices), actor_optimizer, critic_optimizer
    )
    start_epoch, train_steps_done, wall_offset = 0, 0, 0.0
    if checkpoint is not None:  # a checkpoint that does not fit fails here, before any compile
        saved = restore_state(checkpoint_state(train_state, key), checkpoint["state"], args.resume)
        train_state, key = jax.tree_util.tree_map(jnp.asarray, train_state_of(saved)), jnp.asarray(saved["key"])
        start_epoch, train_steps_done, wall_offset = (
            checkpoint["epoch"] + 1,
            checkpoint["env_steps"],
            checkpoint["wall_time"],
        )
    print(
        f"{SCRIPT}: {len(data['transition_rows'])} transitions, {int(dataset['terminals'].sum())} trajectories; "
        f"params critic {param_count(train_state['critic'])}, actor {param_count(train_state['actor'])}",
        flush=True,
    )
    update = make_update(critic_loss_fn, actor_loss_fn, critic_optimizer, actor_optimizer)
    epoch_fn = jax.jit(
        partial(train_epoch, update=update, steps=args.eval_every, batch_size=args.batch_size, discount=discount),
        donate_argnums=(0,),
    )

    @jax.jit
    def validation_metrics(train_state, val_data, key):
        """Losses on a batch of the -val twin: overfitting shows as a gap to training/."""
        batch = sample_batch(val_data, key, args.batch_size, discount)
        return {
            **critic_loss_fn(train_state["critic"], batch)[1],
            **actor_loss_fn(train_state["actor"], train_state["critic"], batch)[1],
        }

    evaluate = make_evaluator(args, actor, eval_env)
    headline = "eval/episode_success" if is_our_env(args.env) else "eval/success"

    # ---- the loop: one jitted epoch of gradient steps, then evaluate, log, checkpoint ----
    start_time = time.time() - wall_offset
    log = RunLog(args, run_path, start_epoch, args.train_steps // args.eval_every)
    for epoch in log.epochs:
        epoch_start = time.time()
        key, k_train, k_val, k_eval = jax.random.split(key, 4)
        train_state, train_metrics = epoch_fn(train_state, data, k_train)
        train_metrics = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
        epoch_time = time.time() - epoch_start
        train_steps_done += args.eval_every
        log.check_finite(train_metrics, epoch)
        eval_metrics = evaluate(train_state["actor"], k_eval)
        record = {
            "epoch": epoch,
            "env_steps": train_steps_done,
            "train_steps": train_steps_done,
            "wall_time": time.time() - start_time,
            "sps": args.eval_every / epoch_time,
            **{f"training/{k}": v for k, v in train_metrics.items()},
            **{f"eval/{k}": float(v) for k, v in eval_metrics.items()},
        }
        if val_data is not None:
            record.update(
                {f"validation/{k}": float(v) for k, v in validation_metrics(train_state, val_data, k_val).items()}
            )
        log.log(record, train_steps_done, headline)
        save_checkpoint(
            run_path, args, checkpoint_state(train_state, key), epoch, train_steps_done, record["wall_time"]
        )
    log.finish(train_steps_done)
