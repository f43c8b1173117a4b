"""Quasimetric RL (QRL) for goal reaching, online on `envs/` or offline on OGBench-format datasets,
with the paper's depth-scalable residual towers.

    python qrl.py --mode online --env arm_push_easy --depth 16
    python qrl.py --mode offline --dataset data/pointmaze-giant-stitch-v0.npz --env pointmaze-giant-stitch-v0

The value is a learned quasimetric d(s, g) >= 0 (asymmetric, triangle inequality, d(x, x) = 0) between
latents of a state encoder phi(s) and a goal encoder psi(g): an IQE head (or MRN). It is trained by
constrained optimisation: push random (state, goal) pairs apart (minimise mean 100 softplus(5 - d/100)),
subject to one-step distances d(s, s') <= 1 (mean(relu(d - 1)^2) <= eps), with a learned
Lagrange multiplier. A latent dynamics model phi(s) + T(phi(s), a) ~ phi(s') gives
Q(s, a, g) = -d(phi(s) + T(phi(s), a), psi(g)). The actor maximises Q / stop_grad(mean |Q|): offline
DDPG+BC-style with -alpha * log pi(a_data | s, g) (OGBench's), online as a tanh-Gaussian policy with an
entropy bonus (crl_deep.py's actor). Offline defaults are OGBench's QRL agent's; see docs/qrl.md.
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
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclass(frozen=True)
class Args:
    mode: Literal["online", "offline"] = "online"
    """online: collect with the actor on --env and learn from the replay; offline: learn from --dataset"""
    env: str = "arm_push_easy"
    """online: an envs/ id; offline: the evaluation env, an OGBench env name or one of our envs/ ids"""
    eval_env: Optional[str] = None
    """online: environment used for evaluation; default: the `_eval` variant of --env where one exists"""
    dataset: str = ""
    """offline: OGBench-format .npz (observations, actions, terminals); a `<name>-val.npz` twin is used when present"""
    depth: int = 4
    """Dense layers inside the residual blocks of every network (a positive multiple of 4)"""
    actor_depth: Optional[int] = None
    """override --depth for the actor"""
    critic_depth: Optional[int] = None
    """override --depth for the critic: encoders phi(s), psi(g) and the latent dynamics model"""
    width: Optional[int] = None
    """hidden width of every Dense layer (default: online 256, offline 512 as OGBench)"""
    latent_dim: Optional[int] = None
    """size of the latents phi(s), psi(g) the quasimetric compares (default: online 64, offline 512 as OGBench)"""
    quasimetric: Literal["iqe", "mrn"] = "iqe"
    """distance head: IQE (interval quasimetric embedding) or MRN (L2 half + max-ReLU half)"""
    iqe_component_dim: int = 8
    """IQE: latent coordinates per component (OGBench 8); --latent-dim must be a multiple of it"""
    constraint_eps: float = 0.05
    """the dual constraint: mean(relu(d(s, s') - 1)^2) <= eps (OGBench 0.05)"""
    batch_size: Optional[int] = None
    """transitions per gradient step (default: online 256, offline 1024 as OGBench)"""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor"""
    critic_lr: float = 3e-4
    """Adam learning rate of the encoders, the dynamics model, the IQE mixing weight and the multiplier"""
    alpha: Optional[float] = None
    """offline: behaviour-cloning weight of the actor loss (default: 0.0003 pointmaze, else 0.003, as OGBench)"""
    actor_random_goal_prob: Optional[float] = None
    """probability that an actor goal is a random dataset state instead of a future one (default: offline
    stitch datasets 0.5, else 0, as OGBench)"""
    discount: float = 0.99
    """online: gamma of the geometric future actor-goal sampling (offline actor goals are uniform future)"""
    temperature_lr: float = 3e-4
    """online: Adam learning rate of the actor's entropy temperature log(beta) (target entropy -0.5 x action size)"""
    num_envs: int = 512
    """online: parallel training environments"""
    num_eval_envs: int = 128
    """online: parallel evaluation environments (one episode each per epoch)"""
    episode_length: int = 1000
    """online: steps per episode, training and evaluation"""
    total_env_steps: int = 50_000_000
    """online: environment steps of the whole run, prefill included"""
    num_epochs: int = 100
    """online: epochs; after each one the host evaluates, logs and checkpoints"""
    unroll_length: int = 62
    """online: steps collected per env before each block of SGD steps"""
    sgd_steps_per_train_step: int = 800
    """online: SGD steps after each collected unroll"""
    replay_size: int = 10_000
    """online: replay capacity in steps PER ENV (a ring buffer of each env's trajectory)"""
    min_replay_size: int = 1_000
    """online: steps per env collected by the initial policy before training starts"""
    train_steps: int = 1_000_000
    """offline: gradient steps in total (OGBench 1M)"""
    eval_every: int = 100_000
    """offline: gradient steps between evaluations (one epoch: log, evaluate, checkpoint)"""
    eval_episodes: int = 50
    """offline: OGBench: episodes per task (5 tasks); envs/ ids: number of evaluation envs"""
    eval_episode_length: Optional[int] = None
    """offline: cap on evaluation episode length (default: the env's own limit; 1000 for envs/ ids)"""
    layer_norm: bool = True
    """LayerNorm after every hidden Dense (the paper's scaling recipe; --no-layer-norm ablates it)"""
    activation: Literal["swish", "relu"] = "swish"
    """hidden activation (relu only as the paper's ablation)"""
    remat: bool = False
    """recompute each residual block in the backward pass (least memory, one extra forward pass)"""
    scan_unroll: int = 1
    """residual blocks unrolled per iteration of the scan over blocks (speed vs compile time)"""
    matmul_precision: Literal["default", "float32", "bfloat16"] = "default"
    """default: jax's own float32 matmuls (float32 on CPU, TensorFloat32 on NVIDIA Ampere/Hopper GPUs);
    float32: full float32 on every backend; bfloat16: the towers' Dense layers compute in bfloat16
    (params, LayerNorm, heads and losses stay float32; docs/gpu.md)"""
    seed: int = 0
    """random seed"""
    track: bool = False
    """log metrics to wandb (WANDB_MODE=offline works without network)"""
    wandb_project: str = "crl_deep"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user)"""
    run_dir: str = "runs"
    """folder that holds one sub-folder per run"""
    run_name: Optional[str] = None
    """default: {env}__qrl_{mode}__d{depth}__s{seed}__{unix time}"""
    resume: Optional[str] = None
    """continue the run stored in this folder (its own args are used; other flags are ignored)"""
    dry_run: bool = False
    """compile the training epoch from shapes, print its parameters, FLOPs, buffer (or dataset) bytes and XLA's
    memory estimate as one JSON line and exit without a run folder (docs/dry_run.md)"""


SCRIPT = "qrl"
# OGBench's QRL shaping of the push-apart term: 100 * softplus(5 - d / 100) per pair, i.e. a pull of
# slope -1 on d that fades out once d passes ~500 (distances count steps, so far beyond any horizon).
PUSH_SCALE, PUSH_OFFSET = 100.0, 5.0
MULTIPLIER_INIT = 1.0  # the Lagrange multiplier starts at 1 (OGBench's init)
MRN_EPS = 1e-12  # inside the MRN square root: finite gradient where the symmetric halves coincide


def resolve(args: Args) -> Args:
    """Fills the mode-dependent defaults (None fields)."""
    online = args.mode == "online"
    name = args.env
    if args.alpha is not None:
        alpha = args.alpha
    else:
        alpha = 0.0 if online else (0.0003 if name.startswith("pointmaze") else 0.003)
    random_goal = args.actor_random_goal_prob
    if random_goal is None:
        random_goal = 0.5 if (not online and "stitch" in name) else 0.0
    pick = lambda value, online_default, offline_default: (
        value
        if value is not None
        # noqa: E731
        else (online_default if online else offline_default)
    )
    return dataclasses.replace(
        args,
        width=pick(args.width, 256, 512),
        latent_dim=pick(args.latent_dim, 64, 512),
        batch_size=pick(args.batch_size, 256, 1024),
        alpha=alpha,
        actor_random_goal_prob=random_goal,
    )


# --------------------------------------------------------------------------------------------
# Networks: crl_deep.py's residual tower (copied unchanged), heads for QRL
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


class Encoder(nn.Module):
    """A critic encoder (phi(s, a) or psi(g)): the tower, then a linear Dense(repr_dim) head."""

    tower: Tower
    repr_dim: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.repr_dim, kernel_init=kernel_init, name="head")(self.tower(x))


class Dims(NamedTuple):
    """Sizes taken from the env: obs = concat[state (state_dim), goal = state[goal_indices]]."""

    state_dim: int
    goal_indices: tuple
    action_size: int


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


def sample_action(mean, log_std, key):
    """Reparameterised tanh-Gaussian sample and its log-probability (with the tanh correction)."""
    std = jnp.exp(log_std)
    pre_tanh = mean + std * jax.random.normal(key, mean.shape)
    action = jnp.tanh(pre_tanh)
    gaussian_log_prob = -0.5 * ((pre_tanh - mean) / std) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    log_prob = jnp.sum(gaussian_log_prob - jnp.log(1 - action**2 + 1e-6), axis=-1)
    return action, log_prob


class ConstantStdActor(nn.Module):
    """Offline policy: the mean mu(s, g) of OGBench's constant-std (std 1) Gaussian actor."""

    tower: Tower
    action_size: int

    @nn.compact
    def __call__(self, obs):
        return nn.Dense(self.action_size, kernel_init=kernel_init, name="mean")(self.tower(obs))


class Networks(NamedTuple):
    actor: nn.Module  # online: Actor (tanh-Gaussian, entropy-regularised); offline: ConstantStdActor
    state_encoder: Encoder  # phi(s) -> latent
    goal_encoder: Optional[Encoder]  # psi(g) -> latent; None when goals are whole states (psi = phi)
    dynamics: Encoder  # T(concat[phi(s), a]) -> latent change


def goals_are_states(dims: Dims) -> bool:
    """OGBench goals are whole observations: then one encoder embeds states and goals (as OGBench's QRL)."""
    return tuple(dims.goal_indices) == tuple(range(dims.state_dim))


def build_networks(args: Args, dims: Dims) -> Networks:
    args = resolve(args)
    actor_depth = args.actor_depth or args.depth
    critic_depth = args.critic_depth or args.depth

    def tower(depth):
        return make_tower(args, depth)

    return Networks(
        actor=(Actor if args.mode == "online" else ConstantStdActor)(tower(actor_depth), dims.action_size),
        state_encoder=Encoder(tower(critic_depth), args.latent_dim),
        goal_encoder=None if goals_are_states(dims) else Encoder(tower(critic_depth), args.latent_dim),
        dynamics=Encoder(tower(critic_depth), args.latent_dim),
    )


def policy_action(actor, actor_params, observations, goals):
    """Deterministic action: the Gaussian mean clipped to the action box."""
    return jnp.clip(actor.apply(actor_params, jnp.concatenate([observations, goals], -1)), -1.0, 1.0)


def evaluation_action(nets: Networks, actor_params, obs, state_dim: int):
    """The deterministic policy for obs = concat[state, goal]: tanh(mean) online, clip(mean) offline."""
    if isinstance(nets.actor, Actor):
        return deterministic_action(nets.actor, actor_params, obs)
    return policy_action(nets.actor, actor_params, obs[:, :state_dim], obs[:, state_dim:])


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------------------------------------------------
# Quasimetrics: d(x, y) >= 0, d(x, x) = 0, d(x, z) <= d(x, y) + d(y, z), d(x, y) != d(y, x) in general
# --------------------------------------------------------------------------------------------


def iqe(x, y, component_dim: int, mix):
    """Interval quasimetric embedding. The latent is split into components of `component_dim`
    coordinates; a component's distance is the length of the union of the intervals [x_j, max(x_j, y_j)]
    (empty where x_j >= y_j); d = mix * mean + (1 - mix) * max over components. x, y: [..., D]."""
    start = x.reshape(*x.shape[:-1], -1, component_dim)
    end = jnp.maximum(start, y.reshape(*y.shape[:-1], -1, component_dim))
    order = jnp.argsort(start, axis=-1)
    start, end = jnp.take_along_axis(start, order, -1), jnp.take_along_axis(end, order, -1)
    # Sorted by start, interval j adds what lies beyond every earlier interval's end: the union of the
    # earlier ones covers [start_j, max earlier end] of it, since they all start at or before start_j.
    reach = jax.lax.cummax(end, axis=end.ndim - 1)
    covered_before = jnp.concatenate([start[..., :1], reach[..., :-1]], -1)
    components = jnp.sum(jnp.maximum(end - jnp.maximum(start, covered_before), 0.0), -1)
    return mix * jnp.mean(components, -1) + (1 - mix) * jnp.max(components, -1)


def mrn(x, y):
    """Metric residual network: L2 distance of the first halves + max(relu(x - y)) of the second halves."""
    half = x.shape[-1] // 2
    sym = jnp.sqrt(jnp.maximum(jnp.sum((x[..., :half] - y[..., :half]) ** 2, -1), MRN_EPS))
    return sym + jnp.max(jax.nn.relu(x[..., half:] - y[..., half:]), -1)


def distance(critic: dict, x, y, args: Args):
    """d(x, y) between latents with the critic's quasimetric head (rows of x and y paired)."""
    if args.quasimetric == "iqe":
        return iqe(x, y, args.iqe_component_dim, jax.nn.sigmoid(critic["iqe_mix"]))
    return mrn(x, y)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def dual_value_loss(d_far, d_step, multiplier, eps: float):
    """QRL's constrained objective as one loss.

    push: mean(100 softplus(5 - d_far / 100)) over random (state, goal) pairs (minimising it pushes them
    apart); violation: mean(relu(d_step - 1)^2) over one-step pairs; the encoders minimise
    push + stop_grad(lambda) * violation, the multiplier minimises lambda * (eps - stop_grad(violation)),
    so lambda grows while the constraint is violated and shrinks (towards 0) while it holds.
    """
    push = jnp.mean(PUSH_SCALE * jax.nn.softplus(PUSH_OFFSET - d_far / PUSH_SCALE))
    violation = jnp.mean(jax.nn.relu(d_step - 1.0) ** 2)
    value_loss = push + jax.lax.stop_gradient(multiplier) * violation
    multiplier_loss = multiplier * (eps - jax.lax.stop_gradient(violation))
    return value_loss + multiplier_loss, (push, violation)


def gaussian_log_prob(mean, actions):
    """log N(actions; mean, I): the actor is a unit-std Gaussian (OGBench's constant-std actor)."""
    return jnp.sum(-0.5 * (actions - mean) ** 2 - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def ddpg_bc_loss(q, mean, data_actions, alpha):
    """-mean(Q) / stop_grad(mean |Q|) - alpha * mean(log pi(a_data)): the Q term is scale free."""
    q_loss = -jnp.mean(q) / jax.lax.stop_gradient(jnp.mean(jnp.abs(q)) + 1e-6)
    bc_loss = -alpha * jnp.mean(gaussian_log_prob(mean, data_actions))
    return q_loss + bc_loss, (q_loss, bc_loss)


def encode_goals(nets: Networks, critic: dict, goals):
    if nets.goal_encoder is None:
        return nets.state_encoder.apply(critic["state_encoder"], goals)
    return nets.goal_encoder.apply(critic["goal_encoder"], goals)


def predict_next_latent(nets: Networks, critic: dict, latent, action):
    """Latent dynamics: phi(s') ~ phi(s) + T(concat[phi(s), a])."""
    return latent + nets.dynamics.apply(critic["dynamics"], jnp.concatenate([latent, action], -1))


def critic_loss_fn(critic: dict, batch: dict, nets: Networks, args: Args, dims: Dims):
    """Dual value loss + multiplier loss + latent dynamics loss on one batch.

    batch: state, action, next_state [B, state_dim], random_goal [B, goal_size]. One-step pairs are
    (s, s') and, when goals are not whole states, (s, goal of s') as well: reaching g(s') takes one step
    from s, so with the triangle inequality d(s_0, g(s_k)) <= k along any trajectory.
    """
    latent = nets.state_encoder.apply(critic["state_encoder"], batch["state"])
    next_latent = nets.state_encoder.apply(critic["state_encoder"], batch["next_state"])
    d_far = distance(critic, latent, encode_goals(nets, critic, batch["random_goal"]), args)
    d_step = distance(critic, latent, next_latent, args)
    if nets.goal_encoder is not None:
        next_goal = encode_goals(nets, critic, batch["next_state"][:, jnp.asarray(dims.goal_indices)])
        d_step = jnp.concatenate([d_step, distance(critic, latent, next_goal, args)])
    multiplier = jax.nn.softplus(critic["multiplier"])
    value_loss, (push, violation) = dual_value_loss(d_far, d_step, multiplier, args.constraint_eps)
    predicted = predict_next_latent(nets, critic, latent, batch["action"])
    dynamics_loss = 0.5 * jnp.mean(
        distance(critic, predicted, next_latent, args) + distance(critic, next_latent, predicted, args)
    )
    loss = value_loss + dynamics_loss
    metrics = {
        "critic_loss": loss,
        "push_loss": push,
        "constraint_violation": violation,
        "dynamics_loss": dynamics_loss,
        "multiplier": multiplier,
        "d_far_mean": jnp.mean(d_far),
        "d_step_mean": jnp.mean(d_step),
        "d_step_max": jnp.max(d_step),
    }
    if args.quasimetric == "iqe":
        metrics["iqe_mix"] = jax.nn.sigmoid(critic["iqe_mix"])
    return loss, metrics


def actor_loss_fn(actor_params, critic: dict, batch: dict, nets: Networks, args: Args, key=None, log_beta=None):
    """Q(s, a, g) = -d(phi(s) + T(phi(s), a), psi(g)); no gradient reaches the critic.

    Offline (DDPG+BC): a = clip(mu(s, g)), loss -Q / stop_grad(mean |Q|) - alpha log N(a_data; mu, I).
    Online (SAC-style, as crl_deep.py's actor): a ~ pi(. | s, g) reparameterised, loss -Q + beta log pi(a | s, g).
    """
    state, goal = batch["state"], batch["actor_goal"]
    obs = jnp.concatenate([state, goal], -1)
    critic = jax.lax.stop_gradient(critic)

    def q_value(action):
        latent = nets.state_encoder.apply(critic["state_encoder"], state)
        predicted = predict_next_latent(nets, critic, latent, action)
        return -distance(critic, predicted, encode_goals(nets, critic, goal), args)

    if isinstance(nets.actor, Actor):
        mean, log_std = nets.actor.apply(actor_params, obs)
        action, log_prob = sample_action(mean, log_std, key)
        q = q_value(action)
        q_loss = -jnp.mean(q)  # not normalised: Q varies over actions by a small part of its size
        loss = q_loss + jnp.exp(log_beta) * jnp.mean(log_prob)
        return loss, {
            "actor_loss": loss,
            "q_loss": q_loss,
            "q_mean": jnp.mean(q),
            "entropy": -jnp.mean(log_prob),
            "log_prob": log_prob,
        }
    mean = nets.actor.apply(actor_params, obs)
    q = q_value(jnp.clip(mean, -1.0, 1.0))
    loss, (q_loss, bc_loss) = ddpg_bc_loss(q, mean, batch["action"], args.alpha)
    return loss, {
        "actor_loss": loss,
        "q_loss": q_loss,
        "bc_loss": bc_loss,
        "q_mean": jnp.mean(q),
        "bc_mse": jnp.mean((mean - batch["action"]) ** 2),
    }


def init_train_state(key, nets: Networks, args: Args, dims: Dims) -> dict:
    k_actor, k_state, k_goal, k_dyn = jax.random.split(key, 4)
    goal_size = len(dims.goal_indices)
    critic = {
        "state_encoder": nets.state_encoder.init(k_state, jnp.zeros((1, dims.state_dim))),
        "dynamics": nets.dynamics.init(k_dyn, jnp.zeros((1, args.latent_dim + dims.action_size))),
        # softplus(raw) = MULTIPLIER_INIT
        "multiplier": jnp.asarray(math.log(math.expm1(MULTIPLIER_INIT)), jnp.float32),
    }
    if nets.goal_encoder is not None:
        critic["goal_encoder"] = nets.goal_encoder.init(k_goal, jnp.zeros((1, goal_size)))
    if args.quasimetric == "iqe":
        critic["iqe_mix"] = jnp.zeros((), jnp.float32)  # sigmoid(0) = 0.5: half mean, half max
    actor = nets.actor.init(k_actor, jnp.zeros((1, dims.state_dim + goal_size)))
    actor_opt, critic_opt = optax.adam(args.actor_lr), optax.adam(args.critic_lr)
    state = {
        "actor": actor,
        "critic": critic,
        "actor_opt": actor_opt.init(actor),
        "critic_opt": critic_opt.init(critic),
    }
    if isinstance(nets.actor, Actor):  # online: the entropy temperature beta = exp(log_beta), starting at 1
        state["log_beta"] = jnp.zeros((), jnp.float32)
        state["temperature_opt"] = optax.adam(args.temperature_lr).init(state["log_beta"])
    return state


def sgd_step(train_state: dict, batch: dict, key, nets: Networks, args: Args, dims: Dims):
    """One critic and one actor update (online also the temperature), all from the same pre-update critic."""
    actor_opt, critic_opt = optax.adam(args.actor_lr), optax.adam(args.critic_lr)
    (_, critic_metrics), critic_grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
        train_state["critic"], batch, nets, args, dims
    )
    (_, actor_metrics), actor_grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
        train_state["actor"], train_state["critic"], batch, nets, args, key, train_state.get("log_beta")
    )
    critic_updates, critic_opt_state = critic_opt.update(critic_grads, train_state["critic_opt"])
    actor_updates, actor_opt_state = actor_opt.update(actor_grads, train_state["actor_opt"])
    new_state = {
        "critic": optax.apply_updates(train_state["critic"], critic_updates),
        "actor": optax.apply_updates(train_state["actor"], actor_updates),
        "critic_opt": critic_opt_state,
        "actor_opt": actor_opt_state,
    }
    if "log_beta" in train_state:  # beta rises while the entropy is below the target, as in crl_deep.py
        entropy_gap = jax.lax.stop_gradient(-actor_metrics.pop("log_prob") + 0.5 * dims.action_size)
        temperature_opt = optax.adam(args.temperature_lr)
        grad = jax.grad(lambda log_beta: jnp.exp(log_beta) * jnp.mean(entropy_gap))(train_state["log_beta"])
        updates, new_state["temperature_opt"] = temperature_opt.update(grad, train_state["temperature_opt"])
        new_state["log_beta"] = optax.apply_updates(train_state["log_beta"], updates)
        actor_metrics["beta"] = jnp.exp(train_state["log_beta"])
    return new_state, {**critic_metrics, **actor_metrics}


# --------------------------------------------------------------------------------------------
# Online replay: crl_deep.py's ring buffer of each env's trajectory (copied unchanged)
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


def buffer_sample_transitions(
    buffer: dict, key, batch_size: int, discount: float, goal_indices, random_goal_prob: float, tries: int = 4
) -> dict:
    """A QRL batch from the ring: (s, a, s') of one episode, an actor goal from the same episode's
    geometric future (or, with probability random_goal_prob, a random stored state's goal) and a random
    goal (any stored step of any env) for the push-apart term.

    Sampling of envs and anchors as crl_deep.py's buffer_sample: each env equally often, anchors uniform
    over stored steps with a stored successor in their episode (rejection over `tries` candidates).
    """
    num_envs = buffer["state"].shape[1]
    k_env, k_pos, k_offset, k_rand_env, k_rand_pos, k_mix = jax.random.split(key, 6)
    i = jnp.arange(batch_size)
    group_start = (i * num_envs) // batch_size
    group_size = jnp.maximum(((i + 1) * num_envs) // batch_size - group_start, 1)
    env_idx = group_start + jnp.floor(jax.random.uniform(k_env, (batch_size,)) * group_size).astype(jnp.int32)
    pos = jax.random.randint(k_pos, (tries, batch_size), 0, buffer["size"])
    horizon = jax.vmap(lambda p: _future_steps_in_episode(buffer, env_idx, p))(pos)
    first_ok = jnp.argmax(horizon > 0, axis=0)  # 0 when none is valid
    pos = jnp.take_along_axis(pos, first_ok[None], 0)[0]
    horizon = jnp.take_along_axis(horizon, first_ok[None], 0)[0]
    offset = sample_goal_offsets(k_offset, horizon, discount)
    goal_indices = jnp.asarray(goal_indices)
    rand_env = jax.random.randint(k_rand_env, (2, batch_size), 0, num_envs)
    rand_pos = _physical(buffer, jax.random.randint(k_rand_pos, (2, batch_size), 0, buffer["size"]))
    random_goals = buffer["state"][rand_pos, rand_env][..., goal_indices]  # [2, B, goal]: push, actor
    future_goal = buffer["state"][_physical(buffer, pos + offset), env_idx][:, goal_indices]
    use_random = jax.random.uniform(k_mix, (batch_size, 1)) < random_goal_prob
    return {
        "state": buffer["state"][_physical(buffer, pos), env_idx],
        "action": buffer["action"][_physical(buffer, pos), env_idx],
        "next_state": buffer["state"][_physical(buffer, pos + jnp.minimum(horizon, 1)), env_idx],
        "actor_goal": jnp.where(use_random, random_goals[1], future_goal),
        "random_goal": random_goals[0],
    }


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


def collect_and_insert(carry: dict, env, nets: Networks, args: Args, dims: Dims) -> dict:
    key, k_collect = jax.random.split(carry["key"])
    env_state, states, actions, traj_ids = collect_unroll(
        env,
        nets.actor,
        carry["train_state"]["actor"],
        carry["env_state"],
        k_collect,
        args.unroll_length,
        dims.state_dim,
    )
    buffer = buffer_insert(carry["buffer"], states, actions, traj_ids)
    return {**carry, "key": key, "env_state": env_state, "buffer": buffer}


def prefill(carry: dict, env, nets: Networks, args: Args, dims: Dims, num_unrolls: int) -> dict:
    """Fills the buffer with `num_unrolls` unrolls of the initial policy (no updates)."""
    carry, _ = jax.lax.scan(
        lambda c, _: (collect_and_insert(c, env, nets, args, dims), None), carry, None, length=num_unrolls
    )
    return carry


def online_epoch(carry: dict, env, nets: Networks, args: Args, dims: Dims, num_train_steps: int):
    """`num_train_steps` x (collect an unroll, insert it, `sgd_steps_per_train_step` SGD steps)."""

    def train_step(carry, _):
        carry = collect_and_insert(carry, env, nets, args, dims)
        key, k_sgd = jax.random.split(carry["key"])

        def sgd(train_state, key):
            k_sample, k_sgd = jax.random.split(key)
            batch = buffer_sample_transitions(
                carry["buffer"],
                k_sample,
                args.batch_size,
                args.discount,
                dims.goal_indices,
                args.actor_random_goal_prob,
            )
            return sgd_step(train_state, batch, k_sgd, nets, args, dims)

        train_state, metrics = jax.lax.scan(
            sgd, carry["train_state"], jax.random.split(k_sgd, args.sgd_steps_per_train_step)
        )
        return {**carry, "train_state": train_state, "key": key}, jax.tree_util.tree_map(jnp.mean, metrics)

    carry, metrics = jax.lax.scan(train_step, carry, None, length=num_train_steps)
    return carry, jax.tree_util.tree_map(jnp.mean, metrics)


# --------------------------------------------------------------------------------------------
# Offline data: offline_crl.py's OGBench-format loader and trajectory sampler (copied unchanged)
# --------------------------------------------------------------------------------------------


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


def sample_offline_batch(data: dict, key, batch_size: int, random_goal_prob: float) -> dict:
    """OGBench's QRL sampling: (s, a, s'), push-apart goals uniform over all dataset states, actor goals
    uniform over the trajectory's future (or, with probability random_goal_prob, uniform over the data)."""
    k_rows, k_random, k_mix = jax.random.split(key, 3)
    t, t_next, _, future = sample_indices(data, k_rows, batch_size, 0.99)  # the geometric goal is unused
    random_rows = jax.random.randint(k_random, (2, batch_size), 0, data["goals"].shape[0])
    actor_goal = jnp.where(jax.random.uniform(k_mix, (batch_size,)) < random_goal_prob, random_rows[1], future)
    return {
        "state": data["observations"][t],
        "action": data["actions"][t],
        "next_state": data["observations"][t_next],
        "actor_goal": data["goals"][actor_goal],
        "random_goal": data["goals"][random_rows[0]],
    }


def offline_epoch(train_state: dict, data: dict, key, nets: Networks, args: Args, dims: Dims):
    """`eval_every` gradient steps. `data` is an argument: closed-over arrays would be baked into the program."""

    def step(train_state, k):
        return sgd_step(
            train_state,
            sample_offline_batch(data, k, args.batch_size, args.actor_random_goal_prob),
            None,
            nets,
            args,
            dims,
        )

    train_state, metrics = jax.lax.scan(step, train_state, jax.random.split(key, args.eval_every))
    return train_state, jax.tree_util.tree_map(jnp.mean, metrics)


# --------------------------------------------------------------------------------------------
# Evaluation on OGBench's tasks (offline_crl.py's host loop, copied unchanged)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Input checks, files, checkpoints
# --------------------------------------------------------------------------------------------


def prefill_unrolls(args: Args) -> int:
    return -(-args.min_replay_size // args.unroll_length)


def train_steps_per_epoch(args: Args) -> int:
    prefill_steps = prefill_unrolls(args) * args.unroll_length * args.num_envs
    return (args.total_env_steps - prefill_steps) // (args.num_epochs * args.num_envs * args.unroll_length)


def check_args(args: Args, env_ids=None):
    """Every bad-input check that needs no file, no env and no compilation; `fail`s on the first.

    (tools/grid.py calls check_args(args) to vet a sweep; the dataset file is checked when a run starts.)
    """
    if env_ids is None:
        import envs

        env_ids = envs.ENV_IDS
    args = resolve(args)
    check_common(args)
    if args.mode == "online":
        if args.env not in env_ids:
            fail(f"unknown env {args.env!r}; valid: {', '.join(env_ids)}")
        if args.eval_env is not None and args.eval_env not in env_ids:
            fail(f"unknown eval env {args.eval_env!r}; valid: {', '.join(env_ids)}")
        if args.dataset:
            fail("--dataset is for --mode offline")
    else:
        if not args.dataset:
            fail("--mode offline needs --dataset PATH.npz")
        if not args.env:
            fail("--mode offline needs --env (an OGBench env name or one of our envs/ ids)")
        if args.eval_env is not None:
            fail("--eval-env is for --mode online (offline evaluates on --env)")
    for name in ("depth", "actor_depth", "critic_depth"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 4):
            fail(f"--{name.replace('_', '-')} must be a positive multiple of 4 (got {value})")
    for name in (
        "width",
        "latent_dim",
        "iqe_component_dim",
        "batch_size",
        "scan_unroll",
        "num_envs",
        "num_eval_envs",
        "episode_length",
        "num_epochs",
        "unroll_length",
        "sgd_steps_per_train_step",
        "replay_size",
        "min_replay_size",
        "train_steps",
        "eval_every",
        "eval_episodes",
    ):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    for name in ("actor_lr", "critic_lr", "temperature_lr", "constraint_eps"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.quasimetric == "iqe" and args.latent_dim % args.iqe_component_dim:
        fail(f"--latent-dim {args.latent_dim} must be a multiple of --iqe-component-dim {args.iqe_component_dim}")
    if args.quasimetric == "mrn" and args.latent_dim % 2:
        fail(f"--quasimetric mrn splits the latent in halves: --latent-dim must be even (got {args.latent_dim})")
    if args.alpha < 0:
        fail(f"--alpha must be >= 0 (got {args.alpha})")
    if not 0.0 <= args.actor_random_goal_prob <= 1.0:
        fail(f"--actor-random-goal-prob must be in [0, 1] (got {args.actor_random_goal_prob})")
    if not 0.0 < args.discount < 1.0:
        fail(f"--discount must be in (0, 1) (got {args.discount})")
    if args.mode == "online" and args.alpha:
        fail("--alpha (behaviour cloning) is for --mode offline; the online actor is entropy-regularised")
    if args.eval_episode_length is not None and args.eval_episode_length <= 0:
        fail(f"--eval-episode-length must be positive (got {args.eval_episode_length})")
    if args.mode == "offline":
        if args.train_steps % args.eval_every:
            fail(f"--train-steps ({args.train_steps}) must be a multiple of --eval-every ({args.eval_every})")
        return
    if args.min_replay_size > args.replay_size:
        fail(f"--min-replay-size {args.min_replay_size} exceeds --replay-size {args.replay_size} (steps per env)")
    if args.unroll_length > args.replay_size:
        fail(f"--unroll-length {args.unroll_length} exceeds --replay-size {args.replay_size} (steps per env)")
    if args.min_replay_size < 2:
        fail("--min-replay-size must be at least 2 (a transition needs a stored next step)")
    if train_steps_per_epoch(args) < 1:
        needed = (
            prefill_unrolls(args) * args.unroll_length * args.num_envs
            + args.num_epochs * args.num_envs * args.unroll_length
        )
        fail(f"--total-env-steps {args.total_env_steps} leaves no training step per epoch: need at least {needed}")


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


def checkpoint_state(train_state: dict, key, env_state=None) -> dict:
    """What a checkpoint holds: params {"actor", "state_encoder", ["goal_encoder"], "dynamics", "multiplier",
    ["iqe_mix"]}, the rest of the train state (optimizer states, online log_beta), the key, online the envs."""
    state = {
        "params": {"actor": train_state["actor"], **train_state["critic"]},
        "train_state": {k: v for k, v in train_state.items() if k not in ("actor", "critic")},
        "key": key,
    }
    if env_state is not None:
        state["env_state"] = env_state
    return state


def train_state_of(saved: dict) -> dict:
    """The train state inside a restored checkpoint_state, as fresh device arrays (the epoch donates them)."""
    params = saved["params"]
    train_state = {
        "actor": params["actor"],
        "critic": {k: v for k, v in params.items() if k != "actor"},
        **saved["train_state"],
    }
    return jax.tree_util.tree_map(jnp.array, train_state)


# --------------------------------------------------------------------------------------------
# Main: set up the mode's data and evaluation, then one host iteration per epoch
# --------------------------------------------------------------------------------------------


def setup_online(args: Args, checkpoint):
    """Env, networks, the jitted epoch and evaluation, and the carry (prefilled)."""
    import envs

    raw_env = envs.make(args.env)
    env = envs.wrap_for_training(raw_env, episode_length=args.episode_length)
    eval_env = envs.make(args.eval_env or envs.eval_variant(args.env))
    dims = Dims(raw_env.state_dim, tuple(int(i) for i in raw_env.goal_indices), raw_env.action_size)
    nets = build_networks(args, dims)
    num_train_steps = train_steps_per_epoch(args)
    key = jax.random.PRNGKey(args.seed)
    key, k_init, k_reset = jax.random.split(key, 3)

    @jax.jit
    def initial_carry(k_init, k_reset, key):
        return {
            "train_state": init_train_state(k_init, nets, args, dims),
            "buffer": buffer_init(args.replay_size, args.num_envs, dims.state_dim, dims.action_size),
            "env_state": env.reset(jax.random.split(k_reset, args.num_envs)),
            "key": key,
        }

    carry = initial_carry(k_init, k_reset, key)
    if checkpoint is not None:  # the buffer is refilled by the restored policy
        template = checkpoint_state(carry["train_state"], carry["key"], carry["env_state"])
        saved = restore_state(template, checkpoint["state"], args.resume)
        carry["train_state"] = train_state_of(saved)
        carry["env_state"] = jax.tree_util.tree_map(jnp.array, saved["env_state"])
        carry["key"] = jnp.array(saved["key"])
    carry = jax.jit(lambda c: prefill(c, env, nets, args, dims, prefill_unrolls(args)), donate_argnums=0)(carry)
    epoch_fn = jax.jit(lambda c: online_epoch(c, env, nets, args, dims, num_train_steps), donate_argnums=0)

    @jax.jit
    def evaluate(actor_params, key):
        act = lambda obs: evaluation_action(nets, actor_params, obs, dims.state_dim)
        return envs.evaluate(eval_env, act, key, args.num_eval_envs, args.episode_length)

    return (
        carry,
        epoch_fn,
        evaluate,
        num_train_steps * args.num_envs * args.unroll_length,
        prefill_unrolls(args) * args.unroll_length * args.num_envs,
        dims,
        nets,
    )


def load_offline_data(args: Args):
    """Dataset, -val twin and evaluation env, every check done before anything compiles."""
    if not os.path.isfile(args.dataset):
        fail(f"--dataset {args.dataset!r} does not exist")
    try:
        dataset = load_dataset(args.dataset)
        val_path = args.dataset[: -len(".npz")] + "-val.npz" if args.dataset.endswith(".npz") else ""
        val_dataset = load_dataset(val_path) if os.path.isfile(val_path) else None
    except ValueError as e:
        fail(str(e))
    obs_dim, action_dim = dataset["observations"].shape[1], dataset["actions"].shape[1]
    import envs

    if args.env in envs.ENV_IDS:
        env = envs.make(envs.eval_variant(args.env))
        if obs_dim != env.state_dim or action_dim != env.action_size:
            fail(
                f"dataset has observations of size {obs_dim} and actions of size {action_dim}; env {args.env!r} "
                f"has state_dim {env.state_dim}, action_size {env.action_size}"
            )
        goal_indices = tuple(int(i) for i in env.goal_indices)
    else:
        try:
            env = make_ogbench_env(args.env, args.eval_episode_length)
        except Exception as e:  # gymnasium raises several types for unknown names
            fail(f"--env {args.env!r} is neither one of our envs/ ids nor an OGBench env ({e})")
        env_obs, env_act = env.observation_space.shape, env.action_space.shape
        if env_obs != (obs_dim,) or env_act != (action_dim,):
            fail(
                f"dataset has observations of size {obs_dim} and actions of size {action_dim}; "
                f"OGBench env {args.env!r} has {env_obs[0]} and {env_act[0]}"
            )
        goal_indices = tuple(range(obs_dim))  # OGBench goals are whole observations
    if val_dataset is not None and (
        val_dataset["observations"].shape[1] != obs_dim or val_dataset["actions"].shape[1] != action_dim
    ):
        fail(f"{val_path}: observation/action sizes differ from {args.dataset}")
    return dataset, val_dataset, env, Dims(obs_dim, goal_indices, action_dim)


def setup_offline(args: Args, checkpoint, dataset, val_dataset, env, dims: Dims):
    nets = build_networks(args, dims)
    data = make_device_dataset(dataset, np.asarray(dims.goal_indices))
    val_data = None if val_dataset is None else make_device_dataset(val_dataset, np.asarray(dims.goal_indices))
    key, k_init = jax.random.split(jax.random.PRNGKey(args.seed))
    train_state = jax.jit(lambda k: init_train_state(k, nets, args, dims))(k_init)
    if checkpoint is not None:
        saved = restore_state(checkpoint_state(train_state, key), checkpoint["state"], args.resume)
        train_state, key = train_state_of(saved), jnp.array(saved["key"])
    epoch = jax.jit(lambda ts, data, k: offline_epoch(ts, data, k, nets, args, dims), donate_argnums=0)

    @jax.jit
    def validation(train_state, val_data, key):
        """Losses on one batch of the -val twin: overfitting shows as a gap to training/."""
        batch = sample_offline_batch(val_data, key, args.batch_size, args.actor_random_goal_prob)
        _, critic_metrics = critic_loss_fn(train_state["critic"], batch, nets, args, dims)
        _, actor_metrics = actor_loss_fn(train_state["actor"], train_state["critic"], batch, nets, args)
        return {**critic_metrics, **actor_metrics}

    import envs

    if args.env in envs.ENV_IDS:

        @jax.jit
        def evaluate_ours(actor_params, key):
            act = lambda obs: evaluation_action(nets, actor_params, obs, dims.state_dim)
            return envs.evaluate(env, act, key, args.eval_episodes, args.eval_episode_length or 1000)

        evaluate = lambda actor_params, key: jax.device_get(evaluate_ours(actor_params, key))
    else:
        eval_envs = [env] + [
            make_ogbench_env(args.env, args.eval_episode_length) for _ in range(args.eval_episodes - 1)
        ]
        policy = jax.jit(lambda params, obs, goals: policy_action(nets.actor, params, obs, goals))
        evaluate = lambda actor_params, key: evaluate_ogbench(
            eval_envs, lambda o, g: policy(actor_params, o, g), args.seed
        )
    return train_state, key, data, val_data, epoch, validation, evaluate, nets


def dry_run(args: Args) -> dict:
    """--dry-run: the epoch a real run of the mode would compile (from shapes, same donation), its costs
    printed as one JSON line (dry_run_report). Offline, the dataset is read and checked but kept on the host."""
    skip_compilation_cache()
    args = resolve(args)
    apply_matmul_precision(args)
    key = jax.random.PRNGKey(args.seed)
    if args.mode == "online":
        import envs

        raw_env = envs.make(args.env)
        env = envs.wrap_for_training(raw_env, episode_length=args.episode_length)
        dims = Dims(raw_env.state_dim, tuple(int(i) for i in raw_env.goal_indices), raw_env.action_size)
        nets = build_networks(args, dims)

        def make_carry(key):
            k_init, k_reset, key = jax.random.split(key, 3)
            return {
                "train_state": init_train_state(k_init, nets, args, dims),
                "buffer": buffer_init(args.replay_size, args.num_envs, dims.state_dim, dims.action_size),
                "env_state": env.reset(jax.random.split(k_reset, args.num_envs)),
                "key": key,
            }

        carry = jax.eval_shape(make_carry, key)
        num_train_steps = train_steps_per_epoch(args)
        epoch_fn = jax.jit(lambda c: online_epoch(c, env, nets, args, dims, num_train_steps), donate_argnums=0)
        compile_start = time.time()
        compiled = epoch_fn.lower(carry).compile()
        train_state, data_bytes = carry["train_state"], tree_bytes(carry["buffer"])
        sgd_steps = num_train_steps * args.sgd_steps_per_train_step
    else:
        dataset, _, _, dims = load_offline_data(args)
        nets = build_networks(args, dims)
        with jax.default_device(jax.devices("cpu")[0]):
            data = as_shapes(make_device_dataset(dataset, np.asarray(dims.goal_indices)))
        train_state = jax.eval_shape(lambda k: init_train_state(k, nets, args, dims), key)
        epoch_fn = jax.jit(lambda ts, data, k: offline_epoch(ts, data, k, nets, args, dims), donate_argnums=0)
        compile_start = time.time()
        compiled = epoch_fn.lower(train_state, data, as_shapes(key)).compile()
        data_bytes, sgd_steps = tree_bytes(data), args.eval_every
    compile_seconds = time.time() - compile_start
    critic = train_state["critic"]
    params = {"actor": train_state["actor"], **{k: v for k, v in critic.items() if k.endswith(("encoder", "dynamics"))}}
    # critic loss (all trained): phi(s), phi(s'), psi(random goal), psi(goal of s') when psi is its own
    # network, T(phi(s), a); actor loss: the actor trained, phi(s) and psi(g) forward only, T passing the
    # gradient to the action. Without a goal encoder phi embeds the goals too.
    state_encoder, dynamics = dense_flops(critic["state_encoder"]), dense_flops(critic["dynamics"])
    if "goal_encoder" in critic:
        goal_encoder = dense_flops(critic["goal_encoder"])
        encoders = (state_encoder + goal_encoder) * (2 * PARAM_GRAD + FORWARD)
    else:
        encoders = state_encoder * (3 * PARAM_GRAD + 2 * FORWARD)
    actor_and_dynamics = dense_flops(train_state["actor"]) * PARAM_GRAD + dynamics * (PARAM_GRAD + INPUT_GRAD)
    flops = args.batch_size * (encoders + actor_and_dynamics)
    extra = {"sgd_steps_per_epoch": sgd_steps}
    return dry_run_report(args, compiled, compile_seconds, params, flops, data_bytes, extra)


if __name__ == "__main__":
    argv_args = parse_args()  # with --resume: the run's own (resolved) args
    check_args(argv_args)
    args = resolve(argv_args)
    apply_matmul_precision(args)
    if args.dry_run:  # compile, print the costs, exit: no run folder
        dry_run(args)
        sys.exit(0)
    online = args.mode == "online"
    if not online:
        offline_inputs = load_offline_data(args)  # bad files fail here, before a run folder exists
    checkpoint = load_checkpoint(args.resume) if args.resume is not None else None
    run_path = open_run(argv_args, {"resolved": dataclasses.asdict(args)})
    start_epoch = 0 if checkpoint is None else checkpoint["epoch"] + 1
    env_steps = 0 if checkpoint is None else checkpoint["env_steps"]
    start_time = time.time() - (0.0 if checkpoint is None else checkpoint["wall_time"])
    if online:
        carry, epoch_fn, evaluate, steps_per_epoch, prefill_steps, dims, nets = setup_online(args, checkpoint)
        env_steps += prefill_steps if checkpoint is None else 0
        num_epochs, k_eval_base = args.num_epochs, jax.random.PRNGKey(args.seed + 1)
        train_state = carry["train_state"]
    else:
        train_state, key, data, val_data, epoch_fn, validation, evaluate, nets = setup_offline(
            args, checkpoint, *offline_inputs
        )
        steps_per_epoch, num_epochs = args.eval_every, args.train_steps // args.eval_every
    print(
        f"{SCRIPT} ({args.mode}): params critic {param_count(train_state['critic'])}, "
        f"actor {param_count(train_state['actor'])}",
        flush=True,
    )
    log = RunLog(args, run_path, start_epoch, num_epochs)
    for epoch in log.epochs:
        epoch_start = time.time()
        if online:
            carry, train_metrics = epoch_fn(carry)
            train_state, k_eval = carry["train_state"], jax.random.fold_in(k_eval_base, epoch)
        else:
            key, k_train, k_val, k_eval = jax.random.split(key, 4)
            train_state, train_metrics = epoch_fn(train_state, data, k_train)
        train_metrics = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
        epoch_seconds = time.time() - epoch_start
        env_steps += steps_per_epoch
        log.check_finite(train_metrics, epoch)
        eval_metrics = {f"eval/{k}": float(v) for k, v in evaluate(train_state["actor"], k_eval).items()}
        record = {
            "epoch": epoch,
            "env_steps": env_steps,
            "wall_time": time.time() - start_time,
            "sps": steps_per_epoch / epoch_seconds,
            "epoch_seconds": epoch_seconds,
            **{f"training/{k}": v for k, v in train_metrics.items()},
            **eval_metrics,
        }
        if not online and val_data is not None:
            val_metrics = jax.device_get(validation(train_state, val_data, k_val))
            record.update({f"validation/{k}": float(v) for k, v in val_metrics.items()})
        log.log(record, env_steps, "eval/episode_success" if "eval/episode_success" in record else "eval/success")
        state = (
            checkpoint_state(train_state, carry["key"], carry["env_state"])
            if online
            else checkpoint_state(train_state, key)
        )
        save_checkpoint(run_path, args, state, epoch, env_steps, record["wall_time"])
    log.finish(env_steps)
