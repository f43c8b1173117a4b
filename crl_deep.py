"""Deep contrastive RL (CRL) for goal reaching, trainable at any depth from 4 to 1024.

Reproduces "1000 Layer Networks for Self-Supervised RL" (Wang et al., NeurIPS 2025) on the `envs`
package, in one file:

    python crl_deep.py --env humanoid_u_maze --depth 1024

The critic is a pair of encoders phi(s, a), psi(g) trained with InfoNCE to tell which goal of a
batch was reached in the future of which state-action; the actor maximises the energy
f(s, a, g) = -||phi(s, a) - psi(g)||. All three networks share one residual tower (Dense -> LayerNorm
-> swish, 4 per block), built with `nn.scan` over stacked block parameters so compile time does not
grow with depth. One jitted `lax.scan` runs a whole training epoch (collect, insert, sample, update);
the host loop only evaluates, logs and checkpoints. See docs/crl_deep.md.
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
import types
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclass(frozen=True)
class Args:
    env: str = "humanoid_u_maze"
    """environment id (one of envs.ENV_IDS)"""
    eval_env: Optional[str] = None
    """environment used for evaluation; default: the `_eval` variant of --env where one exists"""
    true_inertia_obs: bool = False
    """humanoid envs only: observe each link's physical inertia instead of the paper's code's features"""
    depth: int = 4
    """Dense layers inside the residual blocks of actor, phi and psi (a positive multiple of 4)"""
    actor_depth: Optional[int] = None
    """override --depth for the actor"""
    critic_depth: Optional[int] = None
    """override --depth for both critic encoders phi(s,a) and psi(g)"""
    width: int = 256
    """hidden width of every Dense layer of the towers"""
    repr_dim: int = 64
    """size of the critic representations phi(s,a) and psi(g)"""
    batch_size: int = 256
    """transitions per SGD step (also the number of InfoNCE negatives + 1)"""
    num_envs: int = 512
    """parallel training environments"""
    num_eval_envs: int = 128
    """parallel evaluation environments (one episode each per epoch)"""
    episode_length: int = 1000
    """steps per episode, training and evaluation"""
    total_env_steps: int = 50_000_000
    """environment steps of the whole run, prefill included"""
    num_epochs: int = 100
    """epochs; after each one the host evaluates, logs and checkpoints"""
    unroll_length: int = 62
    """steps collected per env before each block of SGD steps"""
    sgd_steps_per_train_step: int = 800
    """SGD steps after each collected unroll (update-to-data ratio ~ 1:40 with the defaults)"""
    replay_size: int = 10_000
    """replay capacity in steps PER ENV (a ring buffer of each env's trajectory)"""
    min_replay_size: int = 1_000
    """steps per env collected by the initial policy before training starts"""
    discount: float = 0.99
    """gamma of the geometric future-goal sampling P(k) ~ gamma^k (its only use in CRL)"""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor"""
    critic_lr: float = 3e-4
    """Adam learning rate of phi and psi"""
    alpha_lr: float = 3e-4
    """Adam learning rate of the entropy temperature log(alpha)"""
    target_entropy: Optional[float] = None
    """entropy the temperature steers the policy towards; default -0.5 * action size (the paper's code)"""
    logsumexp_coef: float = 0.1
    """weight of the penalty mean_i(logsumexp_j logits[i, j])^2 added to the critic loss"""
    disable_entropy: bool = False
    """actor loss -mean(f) without the entropy term (the paper code's --disable_entropy; alpha still learns)"""
    energy: Literal["l2", "l2_squared", "dot", "scaled_dot", "cosine", "mrn"] = "l2"
    """critic energy: -||phi-psi||, -||phi-psi||^2, phi.psi, phi.psi/sqrt(repr_dim), cosine, or the MRN
    quasimetric (-d)"""
    loss: Literal["fwd_infonce", "bwd_infonce", "sym_infonce", "binary_nce"] = "fwd_infonce"
    """contrastive critic loss"""
    layer_norm: bool = True
    """LayerNorm after every hidden Dense (the paper's scaling recipe; --no-layer-norm ablates it)"""
    activation: Literal["swish", "relu"] = "swish"
    """hidden activation (relu only as the paper's ablation)"""
    hyperspherical_norm: bool = False
    """after each update project hidden Dense kernels to unit norm along the input axis (SimbaV2)"""
    remat: bool = False
    """recompute each residual block in the backward pass (least memory, one extra forward pass);
    without it only the blocks' matmul outputs are kept and LayerNorm/swish are recomputed"""
    scan_unroll: int = 1
    """residual blocks unrolled per iteration of the scan over blocks (speed vs compile time)"""
    matmul_precision: Literal["default", "float32", "bfloat16"] = "default"
    """default: jax's own float32 matmuls (float32 on CPU, TensorFloat32 on NVIDIA Ampere/Hopper GPUs);
    float32: full float32 on every backend; bfloat16: the towers' Dense layers compute in bfloat16
    (params, LayerNorm, heads and losses stay float32; docs/gpu.md)"""
    cached_reset: bool = False
    """reproduce brax's AutoResetWrapper: one start and goal per env for the whole run"""
    seed: int = 0
    """random seed (the run is deterministic on CPU for a given seed)"""
    num_seeds: int = 1
    """independent agents trained side by side in one process, seeds seed .. seed + num_seeds - 1: one
    compiled epoch vmapped over them; each equals the run of its own --seed (docs/crl_deep.md)"""
    track: bool = False
    """log metrics to wandb (WANDB_MODE=offline works without network)"""
    wandb_project: str = "crl_deep"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user)"""
    run_dir: str = "runs"
    """folder that holds one sub-folder per run"""
    run_name: Optional[str] = None
    """default: {env}__crl_deep__d{depth}__s{seed}__{unix time}"""
    resume: Optional[str] = None
    """continue the run stored in this folder (its own args are used; other flags are ignored)"""
    save_buffer: bool = False
    """also write the replay buffer to <run>/buffer.npz at each checkpoint (OGBench keys)"""
    dry_run: bool = False
    """compile the training epoch from shapes, print its parameters, FLOPs, buffer bytes and XLA's memory
    estimate as one JSON line and exit without a run folder (docs/dry_run.md)"""


SCRIPT = "crl_deep"


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------

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


# --- shared block: tanh_gaussian (identical in every script; tests/test_copies.py) ---
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    """Tanh-Gaussian policy pi(a | s, g): returns (mean, log_std), log_std squashed into [-5, 2]."""

    tower: Tower
    action_size: int

    @nn.compact
    def __call__(self, obs):
        h = self.tower(obs)
        mean = nn.Dense(self.action_size, kernel_init=kernel_init, name="mean")(h)
        raw = nn.Dense(self.action_size, kernel_init=kernel_init, name="log_std")(h)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(raw) + 1)
        return mean, log_std


def deterministic_action(actor: Actor, actor_params, obs):
    """Evaluation action tanh(mean) for obs = concat[state, goal]."""
    mean, _ = actor.apply(actor_params, obs)
    return jnp.tanh(mean)


def sample_action(mean, log_std, key, noise=None):
    """Reparameterised tanh-Gaussian sample and its log-probability (with the tanh correction).

    noise: the standard normal draw itself, in place of one from `key` (a test feeds a recorded one)."""
    std = jnp.exp(log_std)
    noise = jax.random.normal(key, mean.shape) if noise is None else noise
    pre_tanh = mean + std * noise
    action = jnp.tanh(pre_tanh)
    gaussian_log_prob = -0.5 * ((pre_tanh - mean) / std) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    log_prob = jnp.sum(gaussian_log_prob - jnp.log(1 - action**2 + 1e-6), axis=-1)
    return action, log_prob


# --- end shared block: tanh_gaussian ---


class Encoder(nn.Module):
    """A critic encoder (phi(s, a) or psi(g)): the tower, then a linear Dense(repr_dim) head."""

    tower: Tower
    repr_dim: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.repr_dim, kernel_init=kernel_init, name="head")(self.tower(x))


class Networks(NamedTuple):
    actor: Actor
    sa_encoder: Encoder
    g_encoder: Encoder


class Dims(NamedTuple):
    """Sizes taken from the env: obs = concat[state (state_dim), goal = state[goal_indices]]."""

    state_dim: int
    goal_indices: tuple
    action_size: int


def build_networks(args: Args, obs_size: int, goal_size: int, action_size: int) -> Networks:
    """The three flax modules (sizes of inputs are only used by `init_train_state`)."""
    del obs_size, goal_size  # flax infers input sizes; kept in the signature for tools
    actor_depth = args.actor_depth or args.depth
    critic_depth = args.critic_depth or args.depth
    return Networks(
        actor=Actor(make_tower(args, actor_depth), action_size),
        sa_encoder=Encoder(make_tower(args, critic_depth), args.repr_dim),
        g_encoder=Encoder(make_tower(args, critic_depth), args.repr_dim),
    )


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def project_kernels(params):
    """Hyperspherical normalisation: each hidden Dense kernel column gets unit L2 norm over inputs.

    Heads (mean, log_std, head) are left free so the output scale can still be learned.
    """

    def project(path, x):
        names = [getattr(p, "key", "") for p in path]
        if names[-1] != "kernel" or any(n in ("mean", "log_std", "head") for n in names):
            return x
        return x / (jnp.linalg.norm(x, axis=-2, keepdims=True) + 1e-8)

    return jax.tree_util.tree_map_with_path(project, params)


# --------------------------------------------------------------------------------------------
# Energies and losses
# --------------------------------------------------------------------------------------------

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

# --------------------------------------------------------------------------------------------
# Train state and SGD step
# --------------------------------------------------------------------------------------------


class Optimizers(NamedTuple):
    actor: optax.GradientTransformation
    critic: optax.GradientTransformation
    alpha: optax.GradientTransformation


def make_optimizers(args: Args) -> Optimizers:
    """Adam for the actor, the critic (phi and psi together) and log(alpha); built once per run."""
    return Optimizers(optax.adam(args.actor_lr), optax.adam(args.critic_lr), optax.adam(args.alpha_lr))


def target_entropy(args: Args, action_size: int) -> float:
    return -0.5 * action_size if args.target_entropy is None else args.target_entropy


def init_train_state(key, nets: Networks, optimizers: Optimizers, args: Args, dims: Dims) -> dict:
    """Params of the three networks, their Adam states and log(alpha) = 0."""
    k_actor, k_sa, k_g = jax.random.split(key, 3)
    goal_size = len(dims.goal_indices)
    params = {
        "actor": nets.actor.init(k_actor, jnp.zeros((1, dims.state_dim + goal_size))),
        "sa_encoder": nets.sa_encoder.init(k_sa, jnp.zeros((1, dims.state_dim + dims.action_size))),
        "g_encoder": nets.g_encoder.init(k_g, jnp.zeros((1, goal_size))),
    }
    if args.hyperspherical_norm:
        params = project_kernels(params)
    critic_params = {"sa_encoder": params["sa_encoder"], "g_encoder": params["g_encoder"]}
    log_alpha = jnp.zeros((), jnp.float32)
    return {
        "params": params,
        "actor_opt_state": optimizers.actor.init(params["actor"]),
        "critic_opt_state": optimizers.critic.init(critic_params),
        "log_alpha": log_alpha,
        "alpha_opt_state": optimizers.alpha.init(log_alpha),
    }


def critic_loss(critic_params: dict, state, action, goal, nets: Networks, args: Args):
    """The contrastive critic loss (InfoNCE by default) of a batch whose i-th goal is reached from the
    i-th state-action: logits[i, j] = f(phi(s_i, a_i), psi(g_j)). Returns (loss, (logits, psi(g)))."""
    sa_repr = nets.sa_encoder.apply(critic_params["sa_encoder"], jnp.concatenate([state, action], -1))
    g_repr = nets.g_encoder.apply(critic_params["g_encoder"], goal)
    logits = energy(sa_repr, g_repr, args.energy)
    return contrastive_loss(logits, args.loss, args.logsumexp_coef), (logits, g_repr)


def actor_loss(actor_params, sa_params, g_repr, state, goal, alpha, key, nets: Networks, args: Args, noise=None):
    """mean(alpha * log pi(a|s,g) - f(phi(s, a), psi(g))) with a ~ pi (reparameterised), or -mean(f) with
    --disable-entropy; psi(g) comes from the critic loss. Returns (loss, log pi(a|s,g) per sample).
    noise: the policy's standard normal draw, in place of one from `key` (tools/golden_sgd.py)."""
    mean, log_std = nets.actor.apply(actor_params, jnp.concatenate([state, goal], -1))
    new_action, log_prob = sample_action(mean, log_std, key, noise)
    sa_repr = nets.sa_encoder.apply(sa_params, jnp.concatenate([state, new_action], -1))
    q = energy_rowwise(sa_repr, g_repr, args.energy)
    return (-jnp.mean(q) if args.disable_entropy else jnp.mean(alpha * log_prob - q)), log_prob


def alpha_loss(log_alpha, log_prob, entropy_target: float):
    """alpha * mean(-log pi - target): the temperature rises while the policy's entropy is below target."""
    return jnp.exp(log_alpha) * jnp.mean(jax.lax.stop_gradient(-log_prob - entropy_target))


def sgd_step(train_state: dict, batch: dict, key, nets: Networks, optimizers: Optimizers, args: Args, actor_noise=None):
    """One actor + alpha update and one critic update on the same batch.

    batch: state [B, state_dim], action [B, A], goal [B, goal_size] (a future state's goal slice).
    The critic is differentiated first so psi(g) is computed once and reused by the actor loss;
    this is the paper's "actor then critic" exactly: neither update changes the other's inputs.
    """
    params = train_state["params"]
    state, action, goal = batch["state"], batch["action"], batch["goal"]
    critic_params = {"sa_encoder": params["sa_encoder"], "g_encoder": params["g_encoder"]}
    (critic_loss_value, (logits, g_repr)), critic_grads = jax.value_and_grad(critic_loss, has_aux=True)(
        critic_params, state, action, goal, nets, args
    )
    g_repr = jax.lax.stop_gradient(g_repr)
    alpha = jnp.exp(train_state["log_alpha"])
    (actor_loss_value, log_prob), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(
        params["actor"], params["sa_encoder"], g_repr, state, goal, alpha, key, nets, args, actor_noise
    )
    alpha_loss_value, alpha_grad = jax.value_and_grad(alpha_loss)(
        train_state["log_alpha"], log_prob, target_entropy(args, action.shape[-1])
    )

    updates, actor_opt_state = optimizers.actor.update(actor_grads, train_state["actor_opt_state"])
    new_actor = optax.apply_updates(params["actor"], updates)
    updates, critic_opt_state = optimizers.critic.update(critic_grads, train_state["critic_opt_state"])
    new_critic = optax.apply_updates(critic_params, updates)
    updates, alpha_opt_state = optimizers.alpha.update(alpha_grad, train_state["alpha_opt_state"])
    log_alpha = optax.apply_updates(train_state["log_alpha"], updates)
    new_params = {"actor": new_actor, **new_critic}
    if args.hyperspherical_norm:
        new_params = project_kernels(new_params)

    batch_size = logits.shape[0]
    diag = jnp.diagonal(logits)
    metrics = {
        "critic_loss": critic_loss_value,
        "actor_loss": actor_loss_value,
        "alpha_loss": alpha_loss_value,
        "alpha": alpha,
        "entropy": -jnp.mean(log_prob),
        "logits_pos": jnp.mean(diag),
        "logits_neg": (jnp.sum(logits) - jnp.sum(diag)) / (batch_size * (batch_size - 1)),
        "logsumexp": jnp.mean(jax.nn.logsumexp(logits, axis=1)),
        "categorical_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(batch_size)),
    }
    new_state = {
        "params": new_params,
        "actor_opt_state": actor_opt_state,
        "critic_opt_state": critic_opt_state,
        "log_alpha": log_alpha,
        "alpha_opt_state": alpha_opt_state,
    }
    return new_state, metrics


# --------------------------------------------------------------------------------------------
# Replay buffer: a ring of each env's trajectory, time-major [capacity, num_envs, ...]
# --------------------------------------------------------------------------------------------


def buffer_init(capacity: int, num_envs: int, state_dim: int, action_size: int) -> dict:
    """Empty ring buffer. `size` steps per env are valid; the oldest sits at insert_pos - size."""
    return {
        "state": jnp.zeros((capacity, num_envs, state_dim), jnp.float32),
        "action": jnp.zeros((capacity, num_envs, action_size), jnp.float32),
        "traj_id": jnp.zeros((capacity, num_envs), jnp.int32),
        "insert_pos": jnp.zeros((), jnp.int32),
        "size": jnp.zeros((), jnp.int32),
    }


def buffer_insert(buffer: dict, state, action, traj_id) -> dict:
    """Writes an unroll ([T, num_envs, ...]) at the ring's head; overwrites the oldest steps."""
    capacity = buffer["state"].shape[0]
    steps = state.shape[0]
    idx = (buffer["insert_pos"] + jnp.arange(steps)) % capacity
    return {
        "state": buffer["state"].at[idx].set(state),
        "action": buffer["action"].at[idx].set(action),
        "traj_id": buffer["traj_id"].at[idx].set(traj_id),
        "insert_pos": (buffer["insert_pos"] + steps) % capacity,
        "size": jnp.minimum(buffer["size"] + steps, capacity),
    }


def _physical(buffer, logical_pos):
    capacity = buffer["state"].shape[0]
    return (buffer["insert_pos"] - buffer["size"] + logical_pos) % capacity


def _future_steps_in_episode(buffer, env_idx, pos):
    """How many stored steps after logical position `pos` belong to the same episode.

    traj_id never decreases along an env's stored sequence, so a binary search over the logical
    positions (log2(capacity) gathers of [B] elements) finds the episode's last stored step.
    """
    capacity = buffer["state"].shape[0]
    size = buffer["size"]
    own = buffer["traj_id"][_physical(buffer, pos), env_idx]

    def body(_, bounds):
        lo, hi = bounds  # traj_id at lo == own; hi is the first position known to differ (or size)
        mid = (lo + hi) // 2
        same = buffer["traj_id"][_physical(buffer, mid), env_idx] == own
        return jnp.where(same, mid, lo), jnp.where(same, hi, mid)

    iterations = max(1, math.ceil(math.log2(capacity + 1)))
    lo, _ = jax.lax.fori_loop(0, iterations, body, (pos, jnp.full_like(pos, size)))
    return lo - pos


def sample_goal_offsets(key, horizon, discount: float):
    """k in 1..horizon with P(k) ~ discount^k (truncated geometric), by inverting its CDF.

    Rows with horizon 0 get 0.
    """
    u = jax.random.uniform(key, horizon.shape)
    log_d = math.log(discount)
    mass = 1.0 - jnp.exp(horizon.astype(jnp.float32) * log_d)  # 1 - discount^horizon
    k = jnp.ceil(jnp.log1p(-u * mass) / log_d)
    return jnp.clip(k, 1, horizon).astype(jnp.int32)


def buffer_sample(buffer: dict, key, batch_size: int, discount: float, goal_indices, tries: int = 4) -> dict:
    """A batch of (state, action, goal) with the goal from the same episode's geometric future.

    Sample i draws its env from the i-th contiguous group of envs (each env equally often; with
    the batch split across devices, each device samples only its own envs). The anchor step is
    uniform over stored steps that have a stored future in their episode (rejection over `tries`
    candidates; if all fail, the goal is the anchor's own state). Memory O(batch).
    """
    num_envs = buffer["state"].shape[1]
    k_env, k_pos, k_offset = jax.random.split(key, 3)
    i = jnp.arange(batch_size)
    group_start = (i * num_envs) // batch_size
    group_size = jnp.maximum(((i + 1) * num_envs) // batch_size - group_start, 1)
    env_idx = group_start + jnp.floor(jax.random.uniform(k_env, (batch_size,)) * group_size).astype(jnp.int32)
    env_idx = jnp.broadcast_to(env_idx, (tries, batch_size))
    pos = jax.random.randint(k_pos, (tries, batch_size), 0, buffer["size"])
    horizon = jax.vmap(lambda p: _future_steps_in_episode(buffer, env_idx[0], p))(pos)
    first_ok = jnp.argmax(horizon > 0, axis=0)  # 0 when none is valid
    pos = jnp.take_along_axis(pos, first_ok[None], 0)[0]
    horizon = jnp.take_along_axis(horizon, first_ok[None], 0)[0]
    offset = sample_goal_offsets(k_offset, horizon, discount)
    env_idx = env_idx[0]
    anchor = _physical(buffer, pos)
    future = _physical(buffer, pos + offset)
    goal_state = buffer["state"][future, env_idx]
    return {
        "state": buffer["state"][anchor, env_idx],
        "action": buffer["action"][anchor, env_idx],
        "goal": goal_state[:, jnp.asarray(goal_indices)],
    }


# --------------------------------------------------------------------------------------------
# Collection and the training epoch
# --------------------------------------------------------------------------------------------


def collect_unroll(env, actor: Actor, actor_params, env_state, key, unroll_length: int, state_dim: int):
    """Steps the batched training env with the stochastic policy.

    Returns the new env state and (state [T, E, state_dim], action [T, E, A], traj_id [T, E]) of the
    steps taken (each state is the one the action was taken in).
    """

    def step(env_state, key):
        mean, log_std = actor.apply(actor_params, env_state.obs)
        action, _ = sample_action(mean, log_std, key)
        record = (env_state.obs[:, :state_dim], action, env_state.info["traj_id"].astype(jnp.int32))
        return env.step(env_state, action), record

    env_state, (states, actions, traj_ids) = jax.lax.scan(step, env_state, jax.random.split(key, unroll_length))
    return env_state, states, actions, traj_ids


def prefill(carry: dict, env, nets: Networks, args: Args, dims: Dims, num_unrolls: int) -> dict:
    """Fills the buffer with `num_unrolls` unrolls of the initial policy (no updates)."""

    def one(carry, _):
        key, k_collect = jax.random.split(carry["key"])
        env_state, states, actions, traj_ids = collect_unroll(
            env,
            nets.actor,
            carry["train_state"]["params"]["actor"],
            carry["env_state"],
            k_collect,
            args.unroll_length,
            dims.state_dim,
        )
        buffer = buffer_insert(carry["buffer"], states, actions, traj_ids)
        return {**carry, "key": key, "env_state": env_state, "buffer": buffer}, None

    carry, _ = jax.lax.scan(one, carry, None, length=num_unrolls)
    return carry


def train_epoch(
    carry: dict,
    env,
    nets: Networks,
    optimizers: Optimizers,
    args: Args,
    dims: Dims,
    num_train_steps: int,
    batch_sharding=None,
):
    """`num_train_steps` x (collect an unroll, insert it, `sgd_steps_per_train_step` SGD steps).

    carry = {"train_state", "buffer", "env_state", "key"}; returns (carry, epoch-mean metrics).
    """

    def sgd(carry_inner, key):
        train_state, buffer = carry_inner
        k_sample, k_sgd = jax.random.split(key)
        batch = buffer_sample(buffer, k_sample, args.batch_size, args.discount, dims.goal_indices)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        train_state, metrics = sgd_step(train_state, batch, k_sgd, nets, optimizers, args)
        return (train_state, buffer), metrics

    def train_step(carry, _):
        key, k_collect, k_sgd = jax.random.split(carry["key"], 3)
        env_state, states, actions, traj_ids = collect_unroll(
            env,
            nets.actor,
            carry["train_state"]["params"]["actor"],
            carry["env_state"],
            k_collect,
            args.unroll_length,
            dims.state_dim,
        )
        buffer = buffer_insert(carry["buffer"], states, actions, traj_ids)
        (train_state, buffer), metrics = jax.lax.scan(
            sgd, (carry["train_state"], buffer), jax.random.split(k_sgd, args.sgd_steps_per_train_step)
        )
        new_carry = {"train_state": train_state, "buffer": buffer, "env_state": env_state, "key": key}
        return new_carry, jax.tree_util.tree_map(jnp.mean, metrics)

    carry, metrics = jax.lax.scan(train_step, carry, None, length=num_train_steps)
    return carry, jax.tree_util.tree_map(jnp.mean, metrics)


def per_seed(fn, mesh: Mesh):
    """`fn` of one seed's pytree applied to seed-stacked pytrees (--num-seeds): vmapped over the leading
    seed axis, and each device runs its own whole seeds (shard_map: seeds never communicate)."""
    from jax.experimental.shard_map import shard_map

    by_seed = PartitionSpec("data")
    return shard_map(jax.vmap(fn), mesh=mesh, in_specs=by_seed, out_specs=by_seed, check_rep=False)


def carry_builder(env, nets: Networks, optimizers: Optimizers, args: Args, dims: Dims):
    """(k_init, k_reset, key) -> the initial carry {"train_state", "buffer", "env_state", "key"}; with
    --num-seeds > 1 vmapped: stacked keys from `seed_keys` in, one carry per seed along a leading axis."""

    def make_carry(k_init, k_reset, key):
        return {
            "train_state": init_train_state(k_init, nets, optimizers, args, dims),
            "buffer": buffer_init(args.replay_size, args.num_envs, dims.state_dim, dims.action_size),
            "env_state": env.reset(jax.random.split(k_reset, args.num_envs)),
            "key": key,
        }

    return jax.vmap(make_carry) if args.num_seeds > 1 else make_carry


def compile_epoch(carry_shapes, shardings, mesh: Mesh, env, nets: Networks, optimizers: Optimizers, args: Args, dims):
    """The whole epoch as one XLA program, compiled from shapes alone, its carry donated (updated in place).

    With --num-seeds > 1 it is one program for all seeds (the epoch vmapped over the seed axis);
    its metrics are then [num_seeds] arrays."""
    num_train_steps = train_steps_per_epoch(args)
    if args.num_seeds > 1:
        epoch = per_seed(lambda c: train_epoch(c, env, nets, optimizers, args, dims, num_train_steps), mesh)
        metrics_sharding = NamedSharding(mesh, PartitionSpec("data"))
    else:
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        epoch = lambda c: train_epoch(c, env, nets, optimizers, args, dims, num_train_steps, batch_sharding)
        metrics_sharding = NamedSharding(mesh, PartitionSpec())
    out_shardings = (shardings, metrics_sharding)
    jitted = jax.jit(epoch, in_shardings=(shardings,), out_shardings=out_shardings, donate_argnums=0)
    return jitted.lower(carry_shapes).compile()


def run_prefill(carry: dict, shardings, env, nets: Networks, args: Args, dims: Dims, mesh: Optional[Mesh] = None):
    """The replay buffer filled by `prefill_unrolls(args)` unrolls of the initial policy, in one jitted scan
    (of every seed: `mesh` is needed with --num-seeds > 1)."""
    fill = lambda c: prefill(c, env, nets, args, dims, prefill_unrolls(args))
    if args.num_seeds > 1:
        fill = per_seed(fill, mesh)
    return jax.jit(fill, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)(carry)


def make_evaluator(eval_env, nets: Networks, args: Args):
    """jit(actor params, key) -> the paper's metrics of the deterministic policy over num_eval_envs episodes.

    With --num-seeds > 1: seed-stacked params and keys in, [num_seeds] metrics out."""
    import envs

    def evaluate_policy(actor_params, key):
        act = lambda obs: deterministic_action(nets.actor, actor_params, obs)
        return envs.evaluate(eval_env, act, key, args.num_eval_envs, args.episode_length)

    return jax.jit(jax.vmap(evaluate_policy) if args.num_seeds > 1 else evaluate_policy)


def eval_key(eval_key_base, epoch: int):
    """The evaluation key of `epoch` (each seed's own, for a seed-stacked base key)."""
    if eval_key_base.ndim > 1:
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(eval_key_base, epoch)
    return jax.random.fold_in(eval_key_base, epoch)


def seed_rows(metrics: dict) -> list:
    """Metrics of the device (scalars, or [num_seeds] arrays) as one dict of floats per seed."""
    metrics = {k: np.atleast_1d(v) for k, v in jax.device_get(metrics).items()}
    num_seeds = len(next(iter(metrics.values())))
    return [{k: float(v[i]) for k, v in metrics.items()} for i in range(num_seeds)]


def seed_keys(args: Args):
    """(key, k_init, k_reset, k_eval_base) as a run of --seed derives them; with --num-seeds > 1 each a
    [num_seeds, 2] stack of the keys runs of --seed seed, seed + 1, ... would use."""
    keys = [jax.random.split(jax.random.PRNGKey(args.seed + i), 4) for i in range(args.num_seeds)]
    return tuple(keys[0] if args.num_seeds == 1 else jnp.stack(keys, axis=1))


def device_peak_memory(devices) -> dict:
    """{"device_peak_bytes": the largest peak of bytes in use over `devices`} where the backend counts it
    (GPU, TPU), else {} (jax's CPU devices report no memory stats): a run's real device memory, beside
    the dry run's estimate."""
    stats = [d.memory_stats() for d in devices]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    return {"device_peak_bytes": max(peaks)} if peaks else {}


def log_backend():
    """One stderr line naming the backend and devices, so a GPU run that fell back to the CPU is seen at once."""
    devices = ", ".join(f"{d} ({d.device_kind})" for d in jax.devices())
    backend = f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)"
    print(f"{SCRIPT}: {backend}: {devices}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Input checks, the run's state on disk
# --------------------------------------------------------------------------------------------


def prefill_unrolls(args: Args) -> int:
    return -(-args.min_replay_size // args.unroll_length)


def train_steps_per_epoch(args: Args) -> int:
    prefill_steps = prefill_unrolls(args) * args.unroll_length * args.num_envs
    return (args.total_env_steps - prefill_steps) // (args.num_epochs * args.num_envs * args.unroll_length)


def check_args(args: Args, env_ids=None, num_devices: Optional[int] = None):
    """Every bad-input check that needs no env and no compilation; calls `fail` on the first.

    env_ids defaults to envs.ENV_IDS, num_devices to jax.device_count() (tools/grid.py calls
    check_args(args) to vet a sweep before launching it).
    """
    if env_ids is None:
        import envs

        env_ids = envs.ENV_IDS
    num_devices = num_devices or jax.device_count()
    if args.env not in env_ids:
        fail(f"unknown env {args.env!r}; valid: {', '.join(env_ids)}")
    if args.eval_env is not None and args.eval_env not in env_ids:
        fail(f"unknown eval env {args.eval_env!r}; valid: {', '.join(env_ids)}")
    if args.true_inertia_obs and not all(e.startswith("humanoid") for e in (args.env, args.eval_env or args.env)):
        fail("--true-inertia-obs applies to humanoid envs only")
    check_common(args)
    if args.batch_size < 2:
        fail(f"--batch-size must be at least 2 for contrastive negatives (got {args.batch_size})")
    if args.energy == "mrn" and args.repr_dim % 2:
        fail(f"--energy mrn splits the representation in halves: --repr-dim must be even (got {args.repr_dim})")
    if args.min_replay_size < 2:
        fail("--min-replay-size must be at least 2 (a goal must lie in a stored future step)")
    if args.num_seeds > 1:  # whole seeds per device (shard_map), so envs and batch need not divide
        if args.num_seeds % num_devices:
            fail(f"--num-seeds {args.num_seeds} is not divisible by the {num_devices} devices (whole seeds per device)")
        if jax.process_count() > 1:
            fail("--num-seeds > 1 runs in one process (several processes: one seed each, --num-seeds 1)")
    else:
        if args.num_envs % num_devices:
            fail(f"--num-envs {args.num_envs} is not divisible by the {num_devices} devices")
        if args.batch_size % num_devices:
            fail(f"--batch-size {args.batch_size} is not divisible by the {num_devices} devices")
    if train_steps_per_epoch(args) < 1:
        needed = (
            prefill_unrolls(args) * args.unroll_length * args.num_envs
            + args.num_epochs * args.num_envs * args.unroll_length
        )
        fail(f"--total-env-steps {args.total_env_steps} leaves no training step per epoch: need at least {needed}")


def checkpoint_state(carry: dict) -> dict:
    """What a checkpoint holds: the network params, the rest of the train state (optimizer states,
    log(alpha)), the env state and the key. The replay buffer goes to buffer.npz (--save-buffer)."""
    train_state = carry["train_state"]
    return {
        "params": train_state["params"],
        "train_state": {k: v for k, v in train_state.items() if k != "params"},
        "env_state": carry["env_state"],
        "key": carry["key"],
    }


def resumed_carry(carry: dict, saved: dict, run_path: str, epoch: int, args: Args, shardings):
    """The carry of a checkpoint (`saved`, from restore_state), with the buffer saved with it if any.

    Returns (carry, whether the buffer was loaded)."""
    carry = {
        "train_state": {"params": saved["params"], **saved["train_state"]},
        "buffer": carry["buffer"],
        "env_state": saved["env_state"],
        "key": saved["key"],
    }
    buffers = []
    for stem in buffer_stems(args):  # each seed's one saved with the checkpoint
        for name in (f"{stem}.npz", f"{stem}_previous.npz"):
            buffer_file = os.path.join(run_path, name)
            if os.path.isfile(buffer_file) and int(np.load(buffer_file)["_epoch"]) == epoch:
                buffers.append(load_buffer(buffer_file, args.replay_size))
                break
    buffer_loaded = len(buffers) == args.num_seeds
    if buffer_loaded:
        carry["buffer"] = (
            buffers[0] if args.num_seeds == 1 else jax.tree_util.tree_map(lambda *b: np.stack(b), *buffers)
        )
    # Fresh device buffers: on CPU device_put may alias the numpy arrays, which the donated epoch
    # function would then overwrite in place.
    carry = jax.jit(lambda c: jax.tree_util.tree_map(jnp.copy, c), out_shardings=shardings)(carry)
    return carry, buffer_loaded


def init_distributed():
    """A multi-process run (one process per host, or several on one machine) when
    JAX_COORDINATOR_ADDRESS is set; JAX_NUM_PROCESSES and JAX_PROCESS_ID give the process count and
    this process's index where the cluster does not (SLURM and Open MPI do). CPU collectives across
    processes use gloo."""
    if "JAX_COORDINATOR_ADDRESS" not in os.environ:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=int(count) if count else None, process_id=int(index) if index else None)


def buffer_stems(args: Args) -> list:
    """Names (without .npz) of the buffer files: "buffer", or one "buffer_s<seed>" per seed with --num-seeds."""
    return ["buffer"] if args.num_seeds == 1 else [f"buffer_s{args.seed + i}" for i in range(args.num_seeds)]


def save_buffer(run_path: str, buffer: dict, epoch: int, stem: str = "buffer"):
    """<stem>.npz (default buffer.npz) in OGBench format, env after env, oldest step first.

    observations [N, state_dim], actions [N, A], terminals [N] (1 on the last stored step of each
    trajectory); `_traj_id` [N] and `_num_envs` let --resume rebuild the ring exactly, `_epoch` says
    which checkpoint it belongs to.
    """
    buffer = to_numpy(buffer)  # every process gathers; process 0 writes
    if jax.process_index() != 0:
        return
    capacity, num_envs = buffer["traj_id"].shape
    size, insert_pos = int(buffer["size"]), int(buffer["insert_pos"])
    order = (insert_pos - size + np.arange(size)) % capacity
    states = np.swapaxes(buffer["state"][order], 0, 1)  # [E, size, S]
    actions = np.swapaxes(buffer["action"][order], 0, 1)
    traj = np.swapaxes(buffer["traj_id"][order], 0, 1)
    terminals = np.ones_like(traj, dtype=np.float32)
    terminals[:, :-1] = (traj[:, 1:] != traj[:, :-1]).astype(np.float32)
    arrays = {
        "observations": states.reshape(num_envs * size, -1),
        "actions": actions.reshape(num_envs * size, -1),
        "terminals": terminals.reshape(-1),
        "_traj_id": traj.reshape(-1),
        "_num_envs": np.asarray(num_envs),
        "_epoch": np.asarray(epoch),
    }
    tmp, path = os.path.join(run_path, f"{stem}.npz.tmp"), os.path.join(run_path, f"{stem}.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):  # kept until the next checkpoint names the new buffer (kill-safe)
        os.replace(path, os.path.join(run_path, f"{stem}_previous.npz"))
    os.replace(tmp, path)


def load_buffer(path: str, capacity: int) -> dict:
    """Rebuilds the ring from buffer.npz (logical order placed at physical slots 0..size-1)."""
    data = np.load(path)
    num_envs = int(data["_num_envs"])
    size = data["observations"].shape[0] // num_envs
    buffer = jax.device_get(buffer_init(capacity, num_envs, data["observations"].shape[1], data["actions"].shape[1]))
    buffer = {k: np.array(v) for k, v in buffer.items()}
    buffer["state"][:size] = np.swapaxes(data["observations"].reshape(num_envs, size, -1), 0, 1)
    buffer["action"][:size] = np.swapaxes(data["actions"].reshape(num_envs, size, -1), 0, 1)
    buffer["traj_id"][:size] = np.swapaxes(data["_traj_id"].reshape(num_envs, size), 0, 1)
    buffer["insert_pos"] = np.asarray(size % capacity, np.int32)
    buffer["size"] = np.asarray(size, np.int32)
    return buffer


def carry_shardings(carry: dict, mesh: Mesh, num_envs: int, num_seeds: int = 1):
    """Envs and buffer split over the mesh's 'data' axis along the env dimension; the rest replicated.
    A seed-stacked carry (num_seeds > 1) is split along its seed axis instead: whole seeds per device."""
    if num_seeds > 1:
        return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, PartitionSpec("data")), carry)
    replicated = NamedSharding(mesh, PartitionSpec())
    by_env = NamedSharding(mesh, PartitionSpec("data"))
    buffer_by_env = NamedSharding(mesh, PartitionSpec(None, "data"))

    def env_leaf(x):
        return by_env if x.ndim >= 1 and x.shape[0] == num_envs else replicated

    return {
        "train_state": jax.tree_util.tree_map(lambda _: replicated, carry["train_state"]),
        "buffer": {k: buffer_by_env if k in ("state", "action", "traj_id") else replicated for k in carry["buffer"]},
        "env_state": jax.tree_util.tree_map(env_leaf, carry["env_state"]),
        "key": replicated,
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
    """--dry-run: the epoch a real run would compile (from shapes, same donation and shardings), its
    costs printed as one JSON line (dry_run_report). Nothing is initialised, stepped or written."""
    skip_compilation_cache()
    apply_matmul_precision(args)
    import envs

    env_options = {"true_inertia_obs": True} if args.true_inertia_obs else {}
    raw_env = envs.make(args.env, **env_options)
    env = envs.wrap_for_training(raw_env, episode_length=args.episode_length, cached_reset=args.cached_reset)
    stepper = types.SimpleNamespace(step=jax.jit(env.step))  # as a real run: the epoch calls one traced step
    dims = Dims(raw_env.state_dim, tuple(int(i) for i in raw_env.goal_indices), raw_env.action_size)
    nets = build_networks(args, raw_env.observation_size, len(dims.goal_indices), dims.action_size)
    optimizers = make_optimizers(args)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))

    key, k_init, k_reset, _ = seed_keys(args)
    carry_shapes = jax.eval_shape(carry_builder(env, nets, optimizers, args, dims), k_init, k_reset, key)
    # parameters and FLOPs are per agent: with --num-seeds, one seed's slice of the stacked params
    params = carry_shapes["train_state"]["params"]
    if args.num_seeds > 1:
        params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
    shardings = carry_shardings(carry_shapes, mesh, args.num_envs, args.num_seeds)
    compile_start = time.time()
    compiled = compile_epoch(carry_shapes, shardings, mesh, stepper, nets, optimizers, args, dims)
    compile_seconds = time.time() - compile_start
    # critic loss: phi(s, a) and psi(g) trained; actor loss: the actor trained, phi(s, a ~ pi) passing
    # the gradient to the action (psi(g) is reused from the critic loss)
    flops = args.batch_size * (
        dense_flops(params["actor"]) * PARAM_GRAD
        + dense_flops(params["sa_encoder"]) * (PARAM_GRAD + INPUT_GRAD)
        + dense_flops(params["g_encoder"]) * PARAM_GRAD
    )
    sgd_steps = train_steps_per_epoch(args) * args.sgd_steps_per_train_step
    extra = {"sgd_steps_per_epoch": sgd_steps, "num_seeds": args.num_seeds}
    return dry_run_report(args, compiled, compile_seconds, params, flops, tree_bytes(carry_shapes["buffer"]), extra)


# --------------------------------------------------------------------------------------------
# Main: set up, then one host iteration per epoch (train, evaluate, log, checkpoint)
# --------------------------------------------------------------------------------------------

if __name__ == "__main__":
    args = parse_args()
    init_distributed()
    import envs

    check_args(args, envs.ENV_IDS, jax.device_count())
    apply_matmul_precision(args)
    if args.dry_run:  # compile, print the costs, exit: no run folder
        dry_run(args)
        sys.exit(0)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    run_path = open_run(args)
    log_backend()

    # ---- setup: environments, networks, optimizers, the initial state, the compiled epoch ----
    env_options = {"true_inertia_obs": True} if args.true_inertia_obs else {}
    raw_env = envs.make(args.env, **env_options)
    env = envs.wrap_for_training(raw_env, episode_length=args.episode_length, cached_reset=args.cached_reset)
    stepper = types.SimpleNamespace(step=jax.jit(env.step))  # prefill and epoch share one traced step
    eval_env = envs.make(args.eval_env or envs.eval_variant(args.env), **env_options)
    dims = Dims(raw_env.state_dim, tuple(int(i) for i in raw_env.goal_indices), raw_env.action_size)
    nets = build_networks(args, raw_env.observation_size, len(dims.goal_indices), dims.action_size)
    optimizers = make_optimizers(args)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    env_steps_per_epoch = train_steps_per_epoch(args) * args.num_envs * args.unroll_length
    key, k_init, k_reset, k_eval_base = seed_keys(args)  # [num_seeds, 2] each with --num-seeds > 1
    make_carry = carry_builder(env, nets, optimizers, args, dims)
    carry_shapes = jax.eval_shape(make_carry, k_init, k_reset, key)
    shardings = carry_shardings(carry_shapes, mesh, args.num_envs, args.num_seeds)
    initial_carry = jax.jit(make_carry, out_shardings=shardings)  # built in place, split over devices
    if checkpoint is not None:  # a checkpoint that does not fit fails here, before any compile
        saved = restore_state(checkpoint_state(carry_shapes), checkpoint["state"], args.resume)
    # The initial state (its own compile, the env reset and, at depth 1024, ~200M random draws) is
    # built in a background thread while the epoch function compiles from shapes alone: XLA releases
    # the GIL while it compiles, so the two overlap (bench/crl_throughput.py: start-to-first-update).
    compile_start = time.time()
    with ThreadPoolExecutor(1) as pool:
        pending_carry = pool.submit(initial_carry, k_init, k_reset, key)
        epoch_fn = compile_epoch(carry_shapes, shardings, mesh, stepper, nets, optimizers, args, dims)
        compile_seconds = time.time() - compile_start
        carry = pending_carry.result()
    start_epoch, env_steps, wall_offset, buffer_loaded = 0, 0, 0.0, False
    if checkpoint is not None:
        carry, buffer_loaded = resumed_carry(carry, saved, run_path, checkpoint["epoch"], args, shardings)
        start_epoch, env_steps, wall_offset = checkpoint["epoch"] + 1, checkpoint["env_steps"], checkpoint["wall_time"]
    carry = jax.device_put(carry, shardings)
    evaluate_policy = make_evaluator(eval_env, nets, args)
    start_time = time.time() - wall_offset
    if not buffer_loaded:  # a fresh run, or a resume whose buffer was not saved: refill it
        carry = run_prefill(carry, shardings, stepper, nets, args, dims, mesh)
        env_steps += prefill_unrolls(args) * args.unroll_length * args.num_envs

    # ---- the loop: one jitted epoch (collect + update), then evaluate, log, checkpoint ----
    log = RunLog(args, run_path, start_epoch, args.num_epochs)
    for epoch in log.epochs:
        epoch_start = time.time()
        carry, train_metrics = epoch_fn(carry)
        train_metrics = seed_rows(train_metrics)  # a dict of floats per seed; waits for the epoch to finish
        epoch_seconds = time.time() - epoch_start
        env_steps += env_steps_per_epoch  # per seed
        for i, seed_metrics in enumerate(train_metrics):
            log.check_finite(seed_metrics, epoch, args.seed + i if args.num_seeds > 1 else None)
        eval_metrics = evaluate_policy(carry["train_state"]["params"]["actor"], eval_key(k_eval_base, epoch))
        eval_metrics = seed_rows(eval_metrics)
        wall_time = time.time() - start_time
        records = [  # one per seed
            {
                "epoch": epoch,
                **({"seed": args.seed + i} if args.num_seeds > 1 else {}),
                "env_steps": env_steps,
                "wall_time": wall_time,
                "sps": env_steps_per_epoch / epoch_seconds,
                "epoch_seconds": epoch_seconds,
                **({"compile_seconds": compile_seconds} if epoch == start_epoch else {}),
                **device_peak_memory(jax.local_devices()),
                **{f"training/{k}": v for k, v in train_metrics[i].items()},
                **{f"eval/{k}": v for k, v in eval_metrics[i].items()},
            }
            for i in range(args.num_seeds)
        ]
        log.log(records, env_steps, "eval/episode_success")
        if args.save_buffer:  # first, so a checkpoint never names a buffer that is not there yet
            host_buffer = to_numpy(carry["buffer"]) if args.num_seeds > 1 else carry["buffer"]
            for i, stem in enumerate(buffer_stems(args)):
                seed_buffer = host_buffer if args.num_seeds == 1 else {k: v[i] for k, v in host_buffer.items()}
                save_buffer(run_path, seed_buffer, epoch, stem)
        save_checkpoint(run_path, args, checkpoint_state(carry), epoch, env_steps, wall_time)
    log.finish(env_steps)
