"""Quasimetric RL (QRL), online on `envs/` or offline on OGBench-format datasets, with the paper's residual towers.

    python qrl.py --mode online --env arm_push_easy --depth 16
    python qrl.py --mode offline --dataset data/pointmaze-giant-stitch-v0.npz --env pointmaze-giant-stitch-v0

The value is a learned quasimetric d(phi(s), psi(g)) (IQE or MRN) pushing random pairs apart subject to one-step
distances <= 1. The actor maximises Q(s, a, g) = -d(phi(s) + T(phi(s), a), psi(g)) (T: latent dynamics): offline
DDPG+BC (OGBench's QRL), online tanh-Gaussian with an entropy bonus (as crl_deep.py). docs/qrl.md."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Literal, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import envs
import runkit
from envs import ogbench


@dataclasses.dataclass(frozen=True)
class Args(runkit.RunFlags):
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
    """P(an actor goal is a random state, not a future one) (default: offline stitch datasets 0.5, else 0)"""
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
    """default: jax's float32 matmuls (TF32 on NVIDIA Ampere/Hopper); float32: full float32 on every backend;
    bfloat16: the towers' Dense layers in bfloat16 (params, LayerNorm, heads, losses float32; docs/gpu.md)"""


SCRIPT = "qrl"
# OGBench's QRL shaping of the push-apart term: 100 * softplus(5 - d / 100) per pair, i.e. a pull of
# slope -1 on d that fades out once d passes ~500 (distances count steps, so far beyond any horizon).
PUSH_SCALE, PUSH_OFFSET = 100.0, 5.0
MULTIPLIER_INIT = 1.0  # the Lagrange multiplier starts at 1 (OGBench's init)
MRN_EPS = 1e-12  # inside the MRN square root: finite gradient where the symmetric halves coincide


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
    """The tower, then a linear Dense head: phi(s), psi(g), T, or ("mean") OGBench's offline actor mean mu(s, g)."""

    tower: Tower
    out_dim: int
    head: str = "head"

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out_dim, kernel_init=kernel_init, name=self.head)(self.tower(x))


class Dims(NamedTuple):  # sizes taken from the env: obs = concat[state, goal = state[goal_indices]]
    state_dim: int
    goal_indices: tuple
    action_size: int


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
    """Reparameterised tanh-Gaussian sample and its tanh-corrected log-probability; `noise`: a recorded draw."""
    std = jnp.exp(log_std)
    noise = jax.random.normal(key, mean.shape) if noise is None else noise
    pre_tanh = mean + std * noise
    action = jnp.tanh(pre_tanh)
    gaussian_log_prob = -0.5 * ((pre_tanh - mean) / std) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    log_prob = jnp.sum(gaussian_log_prob - jnp.log(1 - action**2 + 1e-6), axis=-1)
    return action, log_prob


# --- end shared block: tanh_gaussian ---


class Networks(NamedTuple):
    actor: nn.Module  # online: Actor (tanh-Gaussian, entropy-regularised); offline: Encoder, the mean mu(s, g)
    state_encoder: Encoder  # phi(s) -> latent
    goal_encoder: Optional[Encoder]  # psi(g) -> latent; None when goals are whole states (psi = phi)
    dynamics: Encoder  # T(concat[phi(s), a]) -> latent change

    def encode_goals(self, critic: dict, goals):  # psi(g), or phi(g) when goals are whole states
        name = "state_encoder" if self.goal_encoder is None else "goal_encoder"
        return getattr(self, name).apply(critic[name], goals)

    def predict_next_latent(self, critic: dict, latent, action):
        """Latent dynamics: phi(s') ~ phi(s) + T(concat[phi(s), a])."""
        return latent + self.dynamics.apply(critic["dynamics"], jnp.concatenate([latent, action], -1))


def build_networks(args: Args, dims: Dims) -> Networks:
    """OGBench's goals are whole observations: then phi embeds the goals too (as OGBench's QRL)."""
    args = resolve(args)
    critic_net = lambda: Encoder(make_tower(args, args.critic_depth or args.depth), args.latent_dim)
    actor_tower = make_tower(args, args.actor_depth or args.depth)
    online, goals_are_states = args.mode == "online", tuple(dims.goal_indices) == tuple(range(dims.state_dim))
    actor = Actor(actor_tower, dims.action_size) if online else Encoder(actor_tower, dims.action_size, "mean")
    return Networks(actor, critic_net(), None if goals_are_states else critic_net(), critic_net())


def iqe(x, y, component_dim: int, mix):
    """Interval quasimetric embedding of x, y [..., D] in components of `component_dim` coordinates: a component's
    distance is the length of the union of [x_j, max(x_j, y_j)]; d = mix * mean + (1 - mix) * max over them."""
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


def dual_value_loss(d_far, d_step, multiplier, eps: float):
    """QRL's constrained objective as one loss: push = mean(100 softplus(5 - d_far / 100)) over random pairs,
    violation = mean(relu(d_step - 1)^2) over one-step pairs. The encoders minimise push + stop_grad(lambda)
    violation, lambda minimises lambda (eps - stop_grad(violation)): it grows while the constraint is violated."""
    push = jnp.mean(PUSH_SCALE * jax.nn.softplus(PUSH_OFFSET - d_far / PUSH_SCALE))
    violation = jnp.mean(jax.nn.relu(d_step - 1.0) ** 2)
    value_loss = push + jax.lax.stop_gradient(multiplier) * violation
    multiplier_loss = multiplier * (eps - jax.lax.stop_gradient(violation))
    return value_loss + multiplier_loss, (push, violation)


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


def critic_loss_fn(critic: dict, batch: dict, nets: Networks, args: Args, dims: Dims):
    """Dual value + multiplier + latent dynamics loss. One-step pairs: (s, s') and, when goals are not whole
    states, (s, goal of s'), so with the triangle inequality d(s_0, g(s_k)) <= k along any trajectory."""
    latent = nets.state_encoder.apply(critic["state_encoder"], batch["state"])
    next_latent = nets.state_encoder.apply(critic["state_encoder"], batch["next_state"])
    d_far = distance(critic, latent, nets.encode_goals(critic, batch["random_goal"]), args)
    d_step = distance(critic, latent, next_latent, args)
    if nets.goal_encoder is not None:
        next_goal = nets.encode_goals(critic, batch["next_state"][:, jnp.asarray(dims.goal_indices)])
        d_step = jnp.concatenate([d_step, distance(critic, latent, next_goal, args)])
    multiplier = jax.nn.softplus(critic["multiplier"])
    value_loss, (push, violation) = dual_value_loss(d_far, d_step, multiplier, args.constraint_eps)
    predicted = nets.predict_next_latent(critic, latent, batch["action"])
    both_ways = distance(critic, predicted, next_latent, args) + distance(critic, next_latent, predicted, args)
    dynamics_loss = 0.5 * jnp.mean(both_ways)
    loss = value_loss + dynamics_loss
    metrics = {"critic_loss": loss, "push_loss": push, "constraint_violation": violation}
    metrics |= {"dynamics_loss": dynamics_loss, "multiplier": multiplier, "d_far_mean": jnp.mean(d_far)}
    metrics |= {"d_step_mean": jnp.mean(d_step), "d_step_max": jnp.max(d_step)}
    if args.quasimetric == "iqe":
        metrics["iqe_mix"] = jax.nn.sigmoid(critic["iqe_mix"])
    return loss, metrics


def actor_loss_fn(actor_params, critic: dict, batch: dict, nets: Networks, args: Args, key=None, log_beta=None):
    """Q(s, a, g) = -d(phi(s) + T(phi(s), a), psi(g)), no gradient to the critic. Offline DDPG+BC on a = clip(mu(s,
    g)); online (as crl_deep.py's actor) a ~ pi(. | s, g) reparameterised, loss -Q + beta log pi(a | s, g)."""
    state, goal = batch["state"], batch["actor_goal"]
    obs = jnp.concatenate([state, goal], -1)
    critic = jax.lax.stop_gradient(critic)

    def q_value(action):
        latent = nets.state_encoder.apply(critic["state_encoder"], state)
        predicted = nets.predict_next_latent(critic, latent, action)
        return -distance(critic, predicted, nets.encode_goals(critic, goal), args)

    if isinstance(nets.actor, Actor):
        mean, log_std = nets.actor.apply(actor_params, obs)
        action, log_prob = sample_action(mean, log_std, key)
        q = q_value(action)
        q_loss = -jnp.mean(q)  # not normalised: Q varies over actions by a small part of its size
        loss = q_loss + jnp.exp(log_beta) * jnp.mean(log_prob)
        metrics = {"actor_loss": loss, "q_loss": q_loss, "q_mean": jnp.mean(q), "entropy": -jnp.mean(log_prob)}
        return loss, {**metrics, "log_prob": log_prob}
    mean = nets.actor.apply(actor_params, obs)
    q = q_value(jnp.clip(mean, -1.0, 1.0))
    loss, (q_loss, bc_loss) = ddpg_bc_loss(q, mean, batch["action"], args.alpha)
    metrics = {"actor_loss": loss, "q_loss": q_loss, "bc_loss": bc_loss, "q_mean": jnp.mean(q)}
    return loss, {**metrics, "bc_mse": jnp.mean((mean - batch["action"]) ** 2)}


def init_train_state(key, nets: Networks, args: Args, dims: Dims) -> dict:
    k_actor, k_state, k_goal, k_dyn = jax.random.split(key, 4)
    goal_size = len(dims.goal_indices)
    critic = {"state_encoder": nets.state_encoder.init(k_state, jnp.zeros((1, dims.state_dim)))}
    critic["dynamics"] = nets.dynamics.init(k_dyn, jnp.zeros((1, args.latent_dim + dims.action_size)))
    critic["multiplier"] = jnp.asarray(math.log(math.expm1(MULTIPLIER_INIT)), jnp.float32)  # softplus: the init
    if nets.goal_encoder is not None:
        critic["goal_encoder"] = nets.goal_encoder.init(k_goal, jnp.zeros((1, goal_size)))
    if args.quasimetric == "iqe":
        critic["iqe_mix"] = jnp.zeros((), jnp.float32)  # sigmoid(0) = 0.5: half mean, half max
    actor = nets.actor.init(k_actor, jnp.zeros((1, dims.state_dim + goal_size)))
    actor_opt, critic_opt = optax.adam(args.actor_lr).init(actor), optax.adam(args.critic_lr).init(critic)
    state = {"actor": actor, "critic": critic, "actor_opt": actor_opt, "critic_opt": critic_opt}
    if isinstance(nets.actor, Actor):  # online: the entropy temperature beta = exp(log_beta), starting at 1
        state["log_beta"] = jnp.zeros((), jnp.float32)
        state["temperature_opt"] = optax.adam(args.temperature_lr).init(state["log_beta"])
    return state


def sgd_step(train_state: dict, batch: dict, key, nets: Networks, args: Args, dims: Dims):
    """One critic and one actor update (online also the temperature), all from the same pre-update critic."""
    actor, critic, log_beta = train_state["actor"], train_state["critic"], train_state.get("log_beta")
    critic_grads, critic_metrics = jax.grad(critic_loss_fn, has_aux=True)(critic, batch, nets, args, dims)
    actor_grads, actor_metrics = jax.grad(actor_loss_fn, has_aux=True)(actor, critic, batch, nets, args, key, log_beta)
    critic_updates, critic_opt = optax.adam(args.critic_lr).update(critic_grads, train_state["critic_opt"])
    actor_updates, actor_opt = optax.adam(args.actor_lr).update(actor_grads, train_state["actor_opt"])
    new_state = {"critic": optax.apply_updates(critic, critic_updates), "critic_opt": critic_opt}
    new_state |= {"actor": optax.apply_updates(actor, actor_updates), "actor_opt": actor_opt}
    if "log_beta" in train_state:  # beta rises while the entropy is below the target, as in crl_deep.py
        entropy_gap = jax.lax.stop_gradient(-actor_metrics.pop("log_prob") + 0.5 * dims.action_size)
        grad = jax.grad(lambda log_beta: jnp.exp(log_beta) * jnp.mean(entropy_gap))(train_state["log_beta"])
        temperature_opt = optax.adam(args.temperature_lr)
        updates, new_state["temperature_opt"] = temperature_opt.update(grad, train_state["temperature_opt"])
        new_state["log_beta"] = optax.apply_updates(train_state["log_beta"], updates)
        actor_metrics["beta"] = jnp.exp(train_state["log_beta"])
    return new_state, {**critic_metrics, **actor_metrics}


# --- shared block: ring_buffer (identical in every script; tests/test_copies.py) ---
def buffer_init(capacity: int, num_envs: int, state_dim: int, action_size: int) -> dict:
    """Empty ring buffer. `size` steps per env are valid; the oldest sits at insert_pos - size."""
    shape, f32 = (capacity, num_envs), jnp.float32
    steps = {"state": jnp.zeros((*shape, state_dim), f32), "action": jnp.zeros((*shape, action_size), f32)}
    counters = {"insert_pos": jnp.zeros((), jnp.int32), "size": jnp.zeros((), jnp.int32)}
    return {**steps, "traj_id": jnp.zeros(shape, jnp.int32), **counters}


def buffer_insert(buffer: dict, state, action, traj_id) -> dict:
    """Writes an unroll ([T, num_envs, ...]) at the ring's head; overwrites the oldest steps."""
    capacity, steps = buffer["state"].shape[0], state.shape[0]
    idx = (buffer["insert_pos"] + jnp.arange(steps)) % capacity
    written = {k: buffer[k].at[idx].set(v) for k, v in (("state", state), ("action", action), ("traj_id", traj_id))}
    size = jnp.minimum(buffer["size"] + steps, capacity)
    return {**written, "insert_pos": (buffer["insert_pos"] + steps) % capacity, "size": size}


def _physical(buffer, logical_pos):
    capacity = buffer["state"].shape[0]
    return (buffer["insert_pos"] - buffer["size"] + logical_pos) % capacity


def _future_steps_in_episode(buffer, env_idx, pos):
    """Stored steps after logical position `pos` in its episode: traj_id never decreases along an env's stored
    sequence, so a binary search (log2(capacity) gathers of [B] elements) finds the episode's last stored step."""
    capacity, size = buffer["state"].shape[0], buffer["size"]
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
    """k in 1..horizon with P(k) ~ discount^k (truncated geometric), by inverting its CDF; 0 where horizon is 0."""
    u = jax.random.uniform(key, horizon.shape)
    log_d = math.log(discount)
    mass = 1.0 - jnp.exp(horizon.astype(jnp.float32) * log_d)  # 1 - discount^horizon
    k = jnp.ceil(jnp.log1p(-u * mass) / log_d)
    return jnp.clip(k, 1, horizon).astype(jnp.int32)


# --- end shared block: ring_buffer ---


def buffer_sample_transitions(
    buffer: dict, key, batch_size: int, discount: float, goal_indices, random_goal_prob: float, tries: int = 4
) -> dict:
    """(s, a, s') of one episode (envs and anchors as crl_deep.py's buffer_sample), an actor goal from its geometric
    future (with random_goal_prob a random stored state's) and a random goal for the push-apart term."""
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
    anchor, next_step = _physical(buffer, pos), _physical(buffer, pos + jnp.minimum(horizon, 1))
    batch = {"state": buffer["state"][anchor, env_idx], "action": buffer["action"][anchor, env_idx]}
    batch |= {"next_state": buffer["state"][next_step, env_idx]}
    return {**batch, "actor_goal": jnp.where(use_random, random_goals[1], future_goal), "random_goal": random_goals[0]}


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


def sample_offline_batch(data: dict, key, batch_size: int, random_goal_prob: float) -> dict:
    """OGBench's QRL sampling: (s, a, s'), push-apart goals uniform over the data, actor goals uniform over the
    trajectory's future (with random_goal_prob uniform over the data)."""
    k_rows, k_random, k_mix = jax.random.split(key, 3)
    t, t_next, _, future = sample_indices(data, k_rows, batch_size, 0.99)  # the geometric goal is unused
    random_rows = jax.random.randint(k_random, (2, batch_size), 0, data["goals"].shape[0])
    actor_goal = jnp.where(jax.random.uniform(k_mix, (batch_size,)) < random_goal_prob, random_rows[1], future)
    batch = {"state": data["observations"][t], "action": data["actions"][t], "next_state": data["observations"][t_next]}
    return {**batch, "actor_goal": data["goals"][actor_goal], "random_goal": data["goals"][random_rows[0]]}


def collect_and_insert(carry: dict, env, nets: Networks, args: Args, dims: Dims) -> dict:
    """An unroll of the training envs with the stochastic policy, its (state, action, traj_id) into the buffer."""
    key, k_collect = jax.random.split(carry["key"])

    def step(env_state, key):
        mean, log_std = nets.actor.apply(carry["train_state"]["actor"], env_state.obs)
        action, _ = sample_action(mean, log_std, key)
        record = (env_state.obs[:, : dims.state_dim], action, env_state.info["traj_id"].astype(jnp.int32))
        return env.step(env_state, action), record

    env_state, steps = jax.lax.scan(step, carry["env_state"], jax.random.split(k_collect, args.unroll_length))
    buffer = buffer_insert(carry["buffer"], *steps)
    return {**carry, "key": key, "env_state": env_state, "buffer": buffer}


def online_epoch(carry: dict, env, nets: Networks, args: Args, dims: Dims, num_train_steps: int):
    """`num_train_steps` x (collect an unroll, `sgd_steps_per_train_step` SGD steps). No runkit.progress callback:
    here it changes how XLA optimises the program, and with it a run's float rounding."""

    def train_step(carry, _):
        carry = collect_and_insert(carry, env, nets, args, dims)
        key, k_sgd = jax.random.split(carry["key"])

        def sgd(train_state, key):
            k_sample, k_sgd = jax.random.split(key)
            sizes = (args.batch_size, args.discount, dims.goal_indices, args.actor_random_goal_prob)
            batch = buffer_sample_transitions(carry["buffer"], k_sample, *sizes)
            return sgd_step(train_state, batch, k_sgd, nets, args, dims)

        keys = jax.random.split(k_sgd, args.sgd_steps_per_train_step)
        train_state, metrics = jax.lax.scan(sgd, carry["train_state"], keys)
        return {**carry, "train_state": train_state, "key": key}, jax.tree_util.tree_map(jnp.mean, metrics)

    carry, metrics = jax.lax.scan(train_step, carry, None, length=num_train_steps)
    return carry, jax.tree_util.tree_map(jnp.mean, metrics)


def offline_epoch(train_state: dict, data: dict, key, nets: Networks, args: Args, dims: Dims):
    """`eval_every` gradient steps. `data` is an argument: closed-over arrays would be baked into the program."""
    sample = lambda k: sample_offline_batch(data, k, args.batch_size, args.actor_random_goal_prob)
    step = lambda train_state, k: sgd_step(train_state, sample(k), None, nets, args, dims)
    train_state, metrics = jax.lax.scan(step, train_state, jax.random.split(key, args.eval_every))
    return train_state, jax.tree_util.tree_map(jnp.mean, metrics)


def resolve(args: Args) -> Args:
    """Fills the mode-dependent defaults (None fields) with the (online, offline) values below."""
    defaults = {"width": (256, 512), "latent_dim": (64, 512), "batch_size": (256, 1024)}
    defaults["alpha"] = (0.0, 0.0003 if args.env.startswith("pointmaze") else 0.003)
    defaults["actor_random_goal_prob"] = (0.0, 0.5 if "stitch" in args.env else 0.0)
    filled = {k: v[args.mode != "online"] for k, v in defaults.items() if getattr(args, k) is None}
    return dataclasses.replace(args, **filled)


def check_args(args: Args, env_ids=None, num_devices: Optional[int] = None):
    """Bad-input checks that need no file, env or compile; env_ids, num_devices as runkit.check_online."""
    fail, args = runkit.fail, resolve(args)
    if args.mode == "online":
        if args.dataset:
            fail("--dataset is for --mode offline")
        runkit.check_online(args, env_ids, num_devices)
        if args.alpha:
            fail("--alpha (behaviour cloning) is for --mode offline; the online actor is entropy-regularised")
        if args.min_replay_size < 2:
            fail("--min-replay-size must be at least 2 (a transition needs a stored next step)")
    else:
        if not args.dataset:
            fail("--mode offline needs --dataset PATH.npz")
        if args.eval_env is not None:
            fail("--eval-env is for --mode online (offline evaluates on --env)")
        runkit.check_common(args)
        if args.train_steps % args.eval_every:
            fail(f"--train-steps ({args.train_steps}) must be a multiple of --eval-every ({args.eval_every})")
    if not args.constraint_eps > 0:
        fail(f"--constraint-eps must be positive (got {args.constraint_eps})")
    if args.quasimetric == "iqe" and args.latent_dim % args.iqe_component_dim:
        fail(f"--latent-dim {args.latent_dim} must be a multiple of --iqe-component-dim {args.iqe_component_dim}")
    if args.quasimetric == "mrn" and args.latent_dim % 2:
        fail(f"--quasimetric mrn splits the latent in halves: --latent-dim must be even (got {args.latent_dim})")
    if not 0.0 <= args.actor_random_goal_prob <= 1.0:
        fail(f"--actor-random-goal-prob must be in [0, 1] (got {args.actor_random_goal_prob})")


def checkpoint_state(train_state: dict, key, env_state=None) -> dict:
    """params {"actor", **critic}, the rest of the train state (optimizers, log_beta), the key, online the envs."""
    rest = {k: v for k, v in train_state.items() if k not in ("actor", "critic")}
    state = {"params": {"actor": train_state["actor"], **train_state["critic"]}, "train_state": rest, "key": key}
    return state if env_state is None else {**state, "env_state": env_state}


def train_state_of(saved: dict) -> dict:
    """The train state inside a restored checkpoint_state, as fresh device arrays (the epoch donates them)."""
    critic = {k: v for k, v in saved["params"].items() if k != "actor"}
    train_state = {"actor": saved["params"]["actor"], "critic": critic, **saved["train_state"]}
    return jax.tree_util.tree_map(jnp.array, train_state)


def setup_online(args: Args, checkpoint=None, dry=False):
    """The initial carry (restored, prefilled; split over devices), the compiled epoch, its compile seconds and
    the evaluation (actor params, key) -> metrics. dry: the compile and the train state's and buffer's shapes."""
    raw_env = envs.make(args.env)
    env = envs.wrap_for_training(raw_env, episode_length=args.episode_length)
    dims = Dims(raw_env.state_dim, tuple(int(i) for i in raw_env.goal_indices), raw_env.action_size)
    nets = build_networks(args, dims)

    def make_carry(k_init, k_reset, key):
        train_state = init_train_state(k_init, nets, args, dims)
        buffer = buffer_init(args.replay_size, args.num_envs, dims.state_dim, dims.action_size)
        env_state = env.reset(jax.random.split(k_reset, args.num_envs))
        return {"train_state": train_state, "buffer": buffer, "env_state": env_state, "key": key}

    key, k_init, k_reset = runkit.seed_keys(args.seed, 1, 3)
    carry_shapes = jax.eval_shape(make_carry, k_init, k_reset, key)
    mesh = runkit.data_mesh()
    shardings = runkit.carry_shardings(carry_shapes, mesh, args.num_envs)
    epoch = lambda c: online_epoch(c, env, nets, args, dims, runkit.train_steps_per_epoch(args))
    out_shardings = (shardings, NamedSharding(mesh, PartitionSpec()))
    jitted = jax.jit(epoch, in_shardings=(shardings,), out_shardings=out_shardings, donate_argnums=0)
    compile_epoch = lambda: jitted.lower(carry_shapes).compile()
    if dry:
        return compile_epoch, carry_shapes["train_state"], carry_shapes["buffer"]
    if checkpoint is not None:  # a checkpoint that does not fit fails here, before any compile
        template = checkpoint_state(carry_shapes["train_state"], carry_shapes["key"], carry_shapes["env_state"])
        saved = runkit.restore_state(template, checkpoint["state"], args.resume)
    make_carry = jax.jit(make_carry, out_shardings=shardings)  # built while the epoch compiles
    epoch_fn, compile_seconds, carry = runkit.compile_beside(compile_epoch, make_carry, k_init, k_reset, key)
    if checkpoint is not None:  # the buffer is refilled by the restored policy
        restored = jax.tree_util.tree_map(jnp.array, {"env_state": saved["env_state"], "key": saved["key"]})
        carry = {**carry, "train_state": train_state_of(saved), **restored}
    unroll = lambda c, _: (collect_and_insert(c, env, nets, args, dims), None)  # the prefill: no updates
    fill = lambda c: jax.lax.scan(unroll, c, None, length=runkit.prefill_unrolls(args))[0]
    carry = jax.jit(fill, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)(carry)
    eval_env = envs.make(args.eval_env or envs.eval_variant(args.env))
    act = lambda params: lambda obs: deterministic_action(nets.actor, params, obs)
    run = jax.jit(lambda p, key: envs.evaluate(eval_env, act(p), key, args.num_eval_envs, args.episode_length))
    evaluate = lambda params, key: {k: float(v) for k, v in jax.device_get(run(params, key)).items()}
    return carry, epoch_fn, evaluate, compile_seconds


def setup_offline(args: Args, checkpoint, dataset, val_dataset, eval_env, goal_indices, dry=False):
    """The train state and key (restored), the data on device, the compiled epoch, its compile seconds, the
    validation (train state, val data, key) -> losses and the evaluation. dry: compile and shapes only."""
    dims = Dims(dataset["observations"].shape[1], tuple(goal_indices), dataset["actions"].shape[1])
    nets = build_networks(args, dims)
    epoch = jax.jit(lambda ts, data, k: offline_epoch(ts, data, k, nets, args, dims), donate_argnums=0)
    compile_epoch = lambda *state_data_key: epoch.lower(*runkit.as_shapes(state_data_key)).compile()
    init = lambda key: init_train_state(key, nets, args, dims)
    if dry:
        with jax.default_device(jax.devices("cpu")[0]):
            data = runkit.as_shapes(make_device_dataset(dataset, goal_indices))
        key, train_state = jax.random.PRNGKey(args.seed), jax.eval_shape(init, jax.random.PRNGKey(args.seed))
        return lambda: compile_epoch(train_state, data, key), train_state, data
    data = make_device_dataset(dataset, goal_indices)
    key, k_init = runkit.seed_keys(args.seed, 1, 2)
    train_state = jax.jit(init)(k_init)
    if checkpoint is not None:
        saved = runkit.restore_state(checkpoint_state(train_state, key), checkpoint["state"], args.resume)
        train_state, key = train_state_of(saved), jnp.array(saved["key"])
    make_val = lambda: None if val_dataset is None else make_device_dataset(val_dataset, goal_indices)
    epoch_fn, compile_seconds, val_data = runkit.compile_beside(lambda: compile_epoch(train_state, data, key), make_val)

    @jax.jit
    def validation(train_state, val_data, key):  # losses on a batch of the -val twin: overfitting shows
        batch = sample_offline_batch(val_data, key, args.batch_size, args.actor_random_goal_prob)
        _, critic_metrics = critic_loss_fn(train_state["critic"], batch, nets, args, dims)
        _, actor_metrics = actor_loss_fn(train_state["actor"], train_state["critic"], batch, nets, args)
        return {**critic_metrics, **actor_metrics}

    act = lambda params, o, g: policy_action(nets.actor, params, o, g)
    evaluate = ogbench.make_evaluator(args.env, eval_env, act, args.eval_episodes, args.eval_episode_length, args.seed)
    return train_state, key, data, val_data, epoch_fn, validation, evaluate, compile_seconds


def dry_run(args: Args) -> dict:
    """--dry-run: the epoch a real run would compile (from shapes), its costs as one JSON line."""
    runkit.skip_compilation_cache()
    args = resolve(args)
    runkit.apply_matmul_precision(args)
    if args.mode == "online":
        compile_epoch, train_state, data = setup_online(args, dry=True)
        sgd_steps = runkit.train_steps_per_epoch(args) * args.sgd_steps_per_train_step
    else:
        inputs = ogbench.load_inputs(args.dataset, args.env, args.eval_episode_length, runkit.fail)
        compile_epoch, train_state, data = setup_offline(args, None, *inputs, dry=True)
        sgd_steps = args.eval_every
    compile_start, compiled = time.time(), compile_epoch()
    compile_seconds = time.time() - compile_start
    critic = train_state["critic"]
    params = {"actor": train_state["actor"], **{k: v for k, v in critic.items() if k.endswith(("encoder", "dynamics"))}}
    # critic loss (all trained): phi(s), phi(s'), psi(random goal), psi(goal of s') (phi when no psi), T(phi(s), a);
    # actor loss: the actor trained, phi(s) and psi(g) forward only, T passing the gradient to the action.
    f = {name: runkit.dense_flops(p) for name, p in params.items()}
    forward, input_grad, param_grad = runkit.FORWARD, runkit.INPUT_GRAD, runkit.PARAM_GRAD
    passes = (2 * param_grad + forward) if "goal_encoder" in f else (3 * param_grad + 2 * forward)
    encoders = (f["state_encoder"] + f.get("goal_encoder", 0)) * passes
    flops = args.batch_size * (encoders + f["actor"] * param_grad + f["dynamics"] * (param_grad + input_grad))
    data_bytes, extra = runkit.tree_bytes(data), {"sgd_steps_per_epoch": sgd_steps}
    return runkit.dry_run_report(args, SCRIPT, compiled, compile_seconds, params, flops, data_bytes, extra)


if __name__ == "__main__":
    argv_args = runkit.parse_args(Args, SCRIPT)  # with --resume: the run's own (resolved) args
    check_args(argv_args)
    args = resolve(argv_args)
    runkit.apply_matmul_precision(args)
    if args.dry_run:  # compile, print the costs, exit: no run folder
        dry_run(args)
        sys.exit(0)
    online = args.mode == "online"
    # offline: dataset, -val twin, eval env, goal indices (bad files fail here, before a run folder)
    inputs = None if online else ogbench.load_inputs(args.dataset, args.env, args.eval_episode_length, runkit.fail)
    checkpoint = runkit.load_checkpoint(args.resume, SCRIPT) if args.resume is not None else None
    run_path = runkit.open_run(argv_args, SCRIPT, {"resolved": dataclasses.asdict(args)})
    runkit.log_backend(SCRIPT)
    resumed = checkpoint or {"epoch": -1, "env_steps": 0, "wall_time": 0.0}  # where the run goes on from
    start_epoch, env_steps, start_time = resumed["epoch"] + 1, resumed["env_steps"], time.time() - resumed["wall_time"]

    # ---- setup: the mode's data (a prefilled replay buffer, or the dataset), networks, the compiled epoch ----
    if online:
        carry, epoch_fn, evaluate, compile_s = setup_online(args, checkpoint)
        if checkpoint is None:  # a resume refills the buffer without counting its steps again
            env_steps += runkit.prefill_unrolls(args) * args.unroll_length * args.num_envs
        num_epochs, bar_steps, train_state = args.num_epochs, runkit.train_steps_per_epoch(args), carry["train_state"]
        steps_per_epoch, k_eval_base = bar_steps * args.num_envs * args.unroll_length, jax.random.PRNGKey(args.seed + 1)
    else:
        offline = setup_offline(args, checkpoint, *inputs)
        train_state, key, data, val_data, epoch_fn, validate, evaluate, compile_s = offline
        steps_per_epoch, num_epochs, bar_steps = args.eval_every, args.train_steps // args.eval_every, 1
    critic_size, actor_size = runkit.tree_size(train_state["critic"]), runkit.tree_size(train_state["actor"])
    print(f"{SCRIPT} ({args.mode}): params critic {critic_size}, actor {actor_size}", flush=True)

    # ---- the loop: one jitted epoch, then evaluate, log, checkpoint ----
    log = runkit.RunLog(args, SCRIPT, run_path, start_epoch, num_epochs, bar_steps, start_time, compile_s)
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
        eval_metrics = evaluate(train_state["actor"], k_eval)
        record = log.record(epoch, env_steps, epoch_seconds, steps_per_epoch, train_metrics, eval_metrics)
        if not online and val_data is not None:
            val_metrics = jax.device_get(validate(train_state, val_data, k_val))
            record.update({f"validation/{k}": float(v) for k, v in val_metrics.items()})
        log.log(record, env_steps, "eval/episode_success" if "eval/episode_success" in record else "eval/success")
        state = checkpoint_state(train_state, *((carry["key"], carry["env_state"]) if online else (key,)))
        log.checkpoint(state, epoch, env_steps, record["wall_time"])
    log.finish(env_steps)
