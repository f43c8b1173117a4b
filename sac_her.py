"""SAC with hindsight experience replay (HER) on the goal-conditioned benchmark, with deep residual nets.

The paper's SAC / SAC+HER baselines (Fig. 12), with the depth-scalable residual tower of crl_deep.py
(Fig. 13). Sparse reward: 1 when the achieved goal of the state a step ends in lies within the env's
success radius of the goal. HER relabels a share of the sampled goals with the achieved goal of a later
step of the same episode (never across a reset); `--her-ratio 0` is plain SAC. One jitted `lax.scan`
runs a whole epoch (collect, insert, sample, update); the host loop only evaluates, logs, checkpoints.

    python sac_her.py --env ant_u4_maze --depth 4
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
from typing import Literal, Optional

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
    depth: int = 4
    """Dense layers inside the residual blocks of the actor and each critic (a positive multiple of 4)"""
    width: int = 256
    """hidden width of every Dense layer of the towers"""
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
    batch_size: int = 256
    """transitions per SGD step"""
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
    """SGD steps (critic, actor, temperature, targets) after each collected unroll"""
    replay_size: int = 10_000
    """replay capacity in steps PER ENV (a ring buffer of each env's trajectory)"""
    min_replay_size: int = 1_000
    """steps per env collected with uniform random actions before training starts"""
    discount: float = 0.9
    """discount of the TD target (the benchmark's SAC default)"""
    learning_rate: float = 1e-4
    """Adam learning rate of actor, critics and temperature"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    target_entropy: Optional[float] = None
    """entropy the temperature steers the policy towards; default -0.5 * action size (the paper's code)"""
    her_strategy: Literal["future", "final"] = "future"
    """hindsight goal: a uniform later step of the episode, or its last stored step"""
    her_ratio: float = 0.8
    """share of sampled transitions whose goal is relabelled (0 = plain SAC)"""
    cached_reset: bool = False
    """reproduce brax's AutoResetWrapper: one start and goal per env for the whole run"""
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
    """default: {env}__sac_her__d{depth}__s{seed}__{unix time}"""
    resume: Optional[str] = None
    """continue the run stored in this folder with its own settings (flags given again must agree, except
    --track, --wandb-*)"""
    dry_run: bool = False
    """compile the training epoch from shapes, print its parameters, FLOPs, buffer bytes and XLA's memory
    estimate as one JSON line and exit without a run folder (docs/dry_run.md)"""


SCRIPT = "sac_her"

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


class QNetwork(nn.Module):
    """Q(state, goal, action) -> scalar."""

    tower: Tower

    @nn.compact
    def __call__(self, obs, action):
        h = self.tower(jnp.concatenate([obs, action], axis=-1))
        return nn.Dense(1, kernel_init=kernel_init, name="head")(h)[..., 0]


class TwinQ(nn.Module):
    """Two independent Q networks (own towers) evaluated in one vmapped call; returns [2, batch]."""

    tower: Tower

    @nn.compact
    def __call__(self, obs, action):
        twin = nn.vmap(
            QNetwork, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0, axis_size=2
        )
        return twin(self.tower.clone(parent=None), name="q")(obs, action)


# ----------------------------------------------------------------------------------------------------
# Replay buffer: a ring of per-env trajectories (time-major), and HER sampling inside one episode
# ----------------------------------------------------------------------------------------------------
def buffer_init(capacity, num_envs, obs_size, action_size, goal_size):
    """Per step: obs (state+goal), action, the achieved goal after the step, the episode id, whether the
    step ended its episode and whether that end was a termination (no bootstrap) rather than a time limit."""
    return {
        "obs": jnp.zeros((capacity, num_envs, obs_size), jnp.float32),
        "action": jnp.zeros((capacity, num_envs, action_size), jnp.float32),
        "next_achieved": jnp.zeros((capacity, num_envs, goal_size), jnp.float32),
        "traj_id": jnp.zeros((capacity, num_envs), jnp.int32),
        "ended": jnp.zeros((capacity, num_envs), jnp.bool_),
        "terminated": jnp.zeros((capacity, num_envs), jnp.bool_),
        "insert_pos": jnp.zeros((), jnp.int32),
        "size": jnp.zeros((), jnp.int32),
    }


def buffer_insert(buffer, steps):
    """Writes a time-major chunk `steps` (dict of [T, num_envs, ...]) at the ring's insert position."""
    capacity = buffer["obs"].shape[0]
    length = steps["obs"].shape[0]
    slots = (buffer["insert_pos"] + jnp.arange(length)) % capacity
    new = {k: buffer[k].at[slots].set(v.astype(buffer[k].dtype)) for k, v in steps.items()}
    new["insert_pos"] = (buffer["insert_pos"] + length) % capacity
    new["size"] = jnp.minimum(buffer["size"] + length, capacity)
    return new


def last_position_of_episode(traj_id, oldest, size, env_idx, pos):
    """Chronological position of the last stored step of the episode holding step `pos` (per sample).

    Episode ids never decrease in time within an env, so a binary search over [pos, size-1] finds it in
    O(log capacity) gathers per sample, with no [batch, capacity] mask."""
    capacity = traj_id.shape[0]
    episode = traj_id[(oldest + pos) % capacity, env_idx]

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi + 1) // 2
        same = traj_id[(oldest + mid) % capacity, env_idx] == episode
        return jnp.where(same, mid, lo), jnp.where(same, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, int(np.ceil(np.log2(capacity))) + 1, halve, (pos, jnp.full_like(pos, size - 1)))
    return lo


def sample_her_batch(buffer, key, batch_size, her_ratio, her_strategy, state_dim, goal_reach_thresh):
    """Draws transitions uniformly from the filled part of the ring and relabels a `her_ratio` share of
    their goals with the achieved goal of a later step of the SAME episode (never across a reset).

    Returns obs/next_obs (concat[state, goal], goal possibly relabelled), action, reward (1 when the
    achieved goal after the step is within the success radius of the goal), bootstrap (0 where the
    episode terminated), valid (0 for the step without a stored successor: newest step of a running
    episode, or the last step of a time-limited one, whose successor state was replaced by the reset),
    relabelled (1 where HER replaced the goal)."""
    capacity, num_envs = buffer["traj_id"].shape
    size = buffer["size"]
    oldest = (buffer["insert_pos"] - size) % capacity
    k_env, k_pos, k_her, k_future = jax.random.split(key, 4)
    # Sample i draws its env from the i-th contiguous group of envs: every env equally often, and with
    # the batch and the buffer split over devices along envs, each device reads only its own envs.
    i = jnp.arange(batch_size)
    group_start = (i * num_envs) // batch_size
    group_size = jnp.maximum(((i + 1) * num_envs) // batch_size - group_start, 1)
    env_idx = group_start + jnp.floor(jax.random.uniform(k_env, (batch_size,)) * group_size).astype(jnp.int32)
    pos = jax.random.randint(k_pos, (batch_size,), 0, size)
    slot = (oldest + pos) % capacity
    next_slot = (oldest + jnp.minimum(pos + 1, size - 1)) % capacity

    last = last_position_of_episode(buffer["traj_id"], oldest, size, env_idx, pos)
    if her_strategy == "future":
        goal_pos = pos + jnp.floor(jax.random.uniform(k_future, (batch_size,)) * (last - pos + 1)).astype(jnp.int32)
        goal_pos = jnp.minimum(goal_pos, last)
    elif her_strategy == "final":
        goal_pos = last
    else:
        raise ValueError(f"unknown her_strategy {her_strategy!r}")
    hindsight_goal = buffer["next_achieved"][(oldest + goal_pos) % capacity, env_idx]

    obs = buffer["obs"][slot, env_idx]
    relabelled = jax.random.uniform(k_her, (batch_size,)) < her_ratio
    goal = jnp.where(relabelled[:, None], hindsight_goal, obs[:, state_dim:])
    next_obs = buffer["obs"][next_slot, env_idx]
    achieved = buffer["next_achieved"][slot, env_idx]
    reward = (jnp.linalg.norm(achieved - goal, axis=-1) < goal_reach_thresh).astype(jnp.float32)
    ended = buffer["ended"][slot, env_idx]
    terminated = buffer["terminated"][slot, env_idx]
    valid = terminated | (~ended & (pos < size - 1))
    return {
        "obs": jnp.concatenate([obs[:, :state_dim], goal], axis=-1),
        "action": buffer["action"][slot, env_idx],
        "reward": reward,
        "next_obs": jnp.concatenate([next_obs[:, :state_dim], goal], axis=-1),
        "bootstrap": (~terminated).astype(jnp.float32),
        "valid": valid.astype(jnp.float32),
        "relabelled": relabelled.astype(jnp.float32),
    }


# ----------------------------------------------------------------------------------------------------
# Losses and one SGD step (critics, then actor, then temperature, then the target critics)
# ----------------------------------------------------------------------------------------------------
def td_target(reward, bootstrap, next_value, discount):
    """r + discount * V(s'), with V(s') dropped where the episode terminated (bootstrap = 0)."""
    return reward + discount * bootstrap * next_value


def soft_update(target_params, online_params, tau):
    """Polyak averaging: target <- (1 - tau) * target + tau * online."""
    return jax.tree_util.tree_map(lambda t, o: (1.0 - tau) * t + tau * o, target_params, online_params)


def masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def critic_loss_fn(critic_params, target_critic_params, actor_params, log_alpha, batch, key, nets, discount):
    """Squared TD error of both critics against the soft value min_i Q'_i(s', a') - alpha log pi(a'|s')."""
    actor, critic = nets
    next_action, next_log_prob = sample_action(*actor.apply(actor_params, batch["next_obs"]), key)
    next_q = jnp.min(critic.apply(target_critic_params, batch["next_obs"], next_action), axis=0)
    next_value = next_q - jnp.exp(log_alpha) * next_log_prob
    target = jax.lax.stop_gradient(td_target(batch["reward"], batch["bootstrap"], next_value, discount))
    q = critic.apply(critic_params, batch["obs"], batch["action"])
    loss = masked_mean(0.5 * jnp.sum((q - target[None]) ** 2, axis=0), batch["valid"])
    return loss, {
        "critic_loss": loss,
        "q_mean": masked_mean(q[0], batch["valid"]),
        "reward_mean": masked_mean(batch["reward"], batch["valid"]),
    }


def actor_loss_fn(actor_params, critic_params, log_alpha, batch, key, nets):
    """alpha * log pi(a|s,g) - min_i Q_i(s, g, a), a ~ pi reparameterised (every sampled state counts)."""
    actor, critic = nets
    action, log_prob = sample_action(*actor.apply(actor_params, batch["obs"]), key)
    q = jnp.min(critic.apply(critic_params, batch["obs"], action), axis=0)
    return jnp.mean(jnp.exp(log_alpha) * log_prob - q), log_prob


def sgd_step(train_state, batch, key, nets, optimizer, args, target_entropy):
    """One SAC update on a HER batch; returns the new train state and scalar metrics."""
    k_critic, k_actor = jax.random.split(key)
    ts = dict(train_state)
    params, target_params = dict(ts["params"]), dict(ts["target_params"])
    (_, metrics), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
        params["critic"],
        target_params["critic"],
        params["actor"],
        ts["log_alpha"],
        batch,
        k_critic,
        nets,
        args.discount,
    )
    updates, ts["critic_opt_state"] = optimizer.update(grads, ts["critic_opt_state"], params["critic"])
    params["critic"] = optax.apply_updates(params["critic"], updates)

    (actor_loss, log_prob), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
        params["actor"], params["critic"], ts["log_alpha"], batch, k_actor, nets
    )
    updates, ts["actor_opt_state"] = optimizer.update(grads, ts["actor_opt_state"], params["actor"])
    params["actor"] = optax.apply_updates(params["actor"], updates)

    entropy_gap = jax.lax.stop_gradient(-log_prob - target_entropy)
    alpha_loss, grad = jax.value_and_grad(lambda la: jnp.exp(la) * jnp.mean(entropy_gap))(ts["log_alpha"])
    updates, ts["alpha_opt_state"] = optimizer.update(grad, ts["alpha_opt_state"], ts["log_alpha"])
    ts["log_alpha"] = optax.apply_updates(ts["log_alpha"], updates)

    target_params["critic"] = soft_update(target_params["critic"], params["critic"], args.tau)
    ts["params"], ts["target_params"] = params, target_params
    metrics.update(
        actor_loss=actor_loss,
        alpha_loss=alpha_loss,
        alpha=jnp.exp(ts["log_alpha"]),
        entropy=-jnp.mean(log_prob),
        her_fraction=jnp.mean(batch["relabelled"]),
    )
    return ts, metrics


def build_networks(args: Args, action_size: int):
    """(actor, twin critic) at --depth / --width (tools may import this)."""
    return Actor(make_tower(args, args.depth), action_size), TwinQ(make_tower(args, args.depth))


def init_train_state(key, nets, optimizer, obs_size: int, action_size: int) -> dict:
    actor, critic = nets
    k_actor, k_critic = jax.random.split(key)
    obs, action = jnp.zeros((1, obs_size)), jnp.zeros((1, action_size))
    params = {"actor": actor.init(k_actor, obs), "critic": critic.init(k_critic, obs, action)}
    log_alpha = jnp.zeros((), jnp.float32)
    return {
        "params": params,
        "target_params": {"critic": jax.tree_util.tree_map(jnp.copy, params["critic"])},
        "actor_opt_state": optimizer.init(params["actor"]),
        "critic_opt_state": optimizer.init(params["critic"]),
        "log_alpha": log_alpha,
        "alpha_opt_state": optimizer.init(log_alpha),
    }


# ----------------------------------------------------------------------------------------------------
# Collection and the training epoch
# ----------------------------------------------------------------------------------------------------
def collect_unroll(env, policy, env_state, key, unroll_length: int, goal_indices):
    """Steps the batched env `unroll_length` times with `policy(obs, key) -> action`.

    Returns the new env state and time-major records ([T, num_envs, ...]) for buffer_insert."""

    def step(env_state, key):
        action = policy(env_state.obs, key)
        next_state = env.step(env_state, action)
        ended = next_state.done > 0
        record = {
            "obs": env_state.obs,
            "action": action,
            "next_achieved": next_state.info["last_obs"][:, jnp.asarray(goal_indices)],
            "traj_id": env_state.info["traj_id"],
            "ended": ended,
            "terminated": ended & (next_state.info["truncation"] == 0),
        }
        return next_state, record

    return jax.lax.scan(step, env_state, jax.random.split(key, unroll_length))


def explore_policy(nets, actor_params):
    """The training behaviour: a sample from the squashed Gaussian."""
    return lambda obs, key: sample_action(*nets[0].apply(actor_params, obs), key)[0]


def random_policy(action_size: int):
    return lambda obs, key: jax.random.uniform(key, (obs.shape[0], action_size), minval=-1.0, maxval=1.0)


def prefill(carry: dict, env, dims: dict, args: Args, num_unrolls: int) -> dict:
    """Fills the buffer with `num_unrolls` unrolls of uniform random actions (no updates)."""

    def one(carry, _):
        key, k_collect = jax.random.split(carry["key"])
        env_state, records = collect_unroll(
            env,
            random_policy(dims["action_size"]),
            carry["env_state"],
            k_collect,
            args.unroll_length,
            dims["goal_indices"],
        )
        return {**carry, "key": key, "env_state": env_state, "buffer": buffer_insert(carry["buffer"], records)}, None

    carry, _ = jax.lax.scan(one, carry, None, length=num_unrolls)
    return carry


def train_epoch(carry: dict, env, nets, optimizer, dims: dict, args: Args, num_train_steps: int, batch_sharding=None):
    """`num_train_steps` x (collect an unroll, insert it, `sgd_steps_per_train_step` SGD steps)."""
    target_entropy = -0.5 * dims["action_size"] if args.target_entropy is None else args.target_entropy

    def sgd(train_state_and_buffer, key):
        train_state, buffer = train_state_and_buffer
        k_sample, k_sgd = jax.random.split(key)
        batch = sample_her_batch(
            buffer,
            k_sample,
            args.batch_size,
            args.her_ratio,
            args.her_strategy,
            dims["state_dim"],
            dims["goal_reach_thresh"],
        )
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        train_state, metrics = sgd_step(train_state, batch, k_sgd, nets, optimizer, args, target_entropy)
        return (train_state, buffer), metrics

    def train_step(carry, _):
        key, k_collect, k_sgd = jax.random.split(carry["key"], 3)
        policy = explore_policy(nets, carry["train_state"]["params"]["actor"])
        env_state, records = collect_unroll(
            env, policy, carry["env_state"], k_collect, args.unroll_length, dims["goal_indices"]
        )
        buffer = buffer_insert(carry["buffer"], records)
        (train_state, buffer), metrics = jax.lax.scan(
            sgd, (carry["train_state"], buffer), jax.random.split(k_sgd, args.sgd_steps_per_train_step)
        )
        new_carry = {"train_state": train_state, "buffer": buffer, "env_state": env_state, "key": key}
        return new_carry, jax.tree_util.tree_map(jnp.mean, metrics)

    carry, metrics = jax.lax.scan(train_step, carry, None, length=num_train_steps)
    return carry, jax.tree_util.tree_map(jnp.mean, metrics)


def epoch_metrics(metrics: dict) -> dict:
    """Host floats of an epoch's (mean) metrics."""
    return {k: float(v) for k, v in metrics.items()}


def compile_epoch(carry, shardings, mesh: Mesh, env, nets, optimizer, dims: dict, args: Args):
    """The whole epoch as one XLA program, its carry donated (updated in place)."""
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    epoch = lambda c: train_epoch(c, env, nets, optimizer, dims, args, train_steps_per_epoch(args), batch_sharding)
    out_shardings = (shardings, NamedSharding(mesh, PartitionSpec()))
    jitted = jax.jit(epoch, in_shardings=(shardings,), out_shardings=out_shardings, donate_argnums=0)
    return jitted.lower(carry).compile()


def run_prefill(carry: dict, shardings, env, dims: dict, args: Args) -> dict:
    """The replay buffer filled by `prefill_unrolls(args)` unrolls of a uniform random policy (one jitted scan)."""
    fill = lambda c: prefill(c, env, dims, args, prefill_unrolls(args))
    return jax.jit(fill, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)(carry)


def make_evaluator(eval_env, nets, args: Args):
    """jit(actor params, key) -> the paper's metrics of the deterministic policy over num_eval_envs episodes."""
    import envs

    def evaluate_policy(actor_params, key):
        act = lambda obs: deterministic_action(nets[0], actor_params, obs)
        return envs.evaluate(eval_env, act, key, args.num_eval_envs, args.episode_length)

    return jax.jit(evaluate_policy)


def resumed_carry(carry: dict, saved: dict) -> dict:
    """The fresh carry with the checkpoint's train state, env state and key (the buffer is refilled)."""
    train_state = {"params": saved["params"], **saved["train_state"]}
    return {"train_state": train_state, "buffer": carry["buffer"], "env_state": saved["env_state"], "key": saved["key"]}


# ----------------------------------------------------------------------------------------------------
# Input checks, the run's state on disk
# ----------------------------------------------------------------------------------------------------
def prefill_unrolls(args: Args) -> int:
    return -(-args.min_replay_size // args.unroll_length)


def train_steps_per_epoch(args: Args) -> int:
    prefill_steps = prefill_unrolls(args) * args.unroll_length * args.num_envs
    return (args.total_env_steps - prefill_steps) // (args.num_epochs * args.num_envs * args.unroll_length)


def check_args(args: Args, env_ids=None, num_devices: Optional[int] = None):
    """Every bad-input check that needs no env and no compilation; calls `fail` on the first.

    env_ids / num_devices default to envs.ENV_IDS / jax.device_count() (tools/grid.py passes args only)."""
    if env_ids is None:
        import envs

        env_ids = envs.ENV_IDS
    num_devices = jax.device_count() if num_devices is None else num_devices
    if args.env not in env_ids:
        fail(f"unknown env {args.env!r}; valid: {', '.join(env_ids)}")
    if args.eval_env is not None and args.eval_env not in env_ids:
        fail(f"unknown eval env {args.eval_env!r}; valid: {', '.join(env_ids)}")
    check_common(args)
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
    """What a checkpoint holds: the network params, the rest of the train state (targets, optimizer
    states), the env state and the key. The replay buffer is not saved: a resume refills it."""
    train_state = carry["train_state"]
    return {
        "params": train_state["params"],
        "train_state": {k: v for k, v in train_state.items() if k != "params"},
        "env_state": carry["env_state"],
        "key": carry["key"],
    }


def carry_shardings(carry: dict, mesh: Mesh, num_envs: int):
    """Envs and buffer split over the mesh's 'data' axis along the env dimension; the rest replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    by_env = NamedSharding(mesh, PartitionSpec("data"))
    buffer_by_env = NamedSharding(mesh, PartitionSpec(None, "data"))

    def env_leaf(x):
        return by_env if x.ndim >= 1 and x.shape[0] == num_envs else replicated

    return {
        "train_state": jax.tree_util.tree_map(lambda _: replicated, carry["train_state"]),
        "buffer": {k: buffer_by_env if v.ndim >= 2 else replicated for k, v in carry["buffer"].items()},
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

    raw_env = envs.make(args.env)
    env = envs.wrap_for_training(raw_env, episode_length=args.episode_length, cached_reset=args.cached_reset)
    dims = {
        "state_dim": raw_env.state_dim,
        "goal_indices": tuple(int(i) for i in raw_env.goal_indices),
        "action_size": raw_env.action_size,
        "goal_reach_thresh": float(raw_env.goal_reach_thresh),
    }
    nets = build_networks(args, raw_env.action_size)
    optimizer = optax.adam(args.learning_rate)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))

    def make_carry(key):
        k_init, k_reset, key = jax.random.split(key, 3)
        return {
            "train_state": init_train_state(k_init, nets, optimizer, raw_env.observation_size, raw_env.action_size),
            "buffer": buffer_init(
                args.replay_size,
                args.num_envs,
                raw_env.observation_size,
                raw_env.action_size,
                len(dims["goal_indices"]),
            ),
            "env_state": env.reset(jax.random.split(k_reset, args.num_envs)),
            "key": key,
        }

    carry_shapes = jax.eval_shape(make_carry, jax.random.PRNGKey(args.seed))
    shardings = carry_shardings(carry_shapes, mesh, args.num_envs)
    compile_start = time.time()
    compiled = compile_epoch(carry_shapes, shardings, mesh, env, nets, optimizer, dims, args)
    compile_seconds = time.time() - compile_start
    params = carry_shapes["train_state"]["params"]
    # critic loss: actor on s' (forward), target critics on s' (forward), critics on s (trained);
    # actor loss: actor on s (trained), critics on (s, a ~ pi) (gradient to the action only)
    actor_flops, critic_flops = dense_flops(params["actor"]), dense_flops(params["critic"])
    flops = args.batch_size * (
        actor_flops * (FORWARD + PARAM_GRAD) + critic_flops * (FORWARD + PARAM_GRAD + INPUT_GRAD)
    )
    sgd_steps = train_steps_per_epoch(args) * args.sgd_steps_per_train_step
    extra = {"sgd_steps_per_epoch": sgd_steps}
    return dry_run_report(args, compiled, compile_seconds, params, flops, tree_bytes(carry_shapes["buffer"]), extra)


# ----------------------------------------------------------------------------------------------------
# Main: set up, then one host iteration per epoch (train, evaluate, log, checkpoint)
# ----------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    args = parse_args()
    import envs

    check_args(args, envs.ENV_IDS, jax.device_count())
    apply_matmul_precision(args)
    if args.dry_run:  # compile, print the costs, exit: no run folder
        dry_run(args)
        sys.exit(0)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    run_path = open_run(args)

    # ---- setup: environments, networks, optimizer, the initial state, the compiled epoch ----
    raw_env = envs.make(args.env)
    env = envs.wrap_for_training(raw_env, episode_length=args.episode_length, cached_reset=args.cached_reset)
    eval_env = envs.make(args.eval_env or envs.eval_variant(args.env))
    dims = {
        "state_dim": raw_env.state_dim,
        "goal_indices": tuple(int(i) for i in raw_env.goal_indices),
        "action_size": raw_env.action_size,
        "goal_reach_thresh": float(raw_env.goal_reach_thresh),
    }
    nets = build_networks(args, raw_env.action_size)
    optimizer = optax.adam(args.learning_rate)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    env_steps_per_epoch = train_steps_per_epoch(args) * args.num_envs * args.unroll_length
    key, k_init, k_reset, k_eval_base = jax.random.split(jax.random.PRNGKey(args.seed), 4)

    @jax.jit
    def initial_carry(k_init, k_reset, key):
        return {
            "train_state": init_train_state(k_init, nets, optimizer, raw_env.observation_size, raw_env.action_size),
            "buffer": buffer_init(
                args.replay_size,
                args.num_envs,
                raw_env.observation_size,
                raw_env.action_size,
                len(dims["goal_indices"]),
            ),
            "env_state": env.reset(jax.random.split(k_reset, args.num_envs)),
            "key": key,
        }

    carry_shapes = initial_carry.eval_shape(k_init, k_reset, key)
    shardings = carry_shardings(carry_shapes, mesh, args.num_envs)
    start_epoch, env_steps, wall_offset = 0, 0, 0.0
    carry = initial_carry(k_init, k_reset, key)
    if checkpoint is not None:  # a checkpoint that does not fit fails here, before any compile
        saved = restore_state(checkpoint_state(carry_shapes), checkpoint["state"], args.resume)
        carry = resumed_carry(carry, saved)
        start_epoch, env_steps, wall_offset = checkpoint["epoch"] + 1, checkpoint["env_steps"], checkpoint["wall_time"]
    carry = jax.device_put(carry, shardings)
    compile_start = time.time()
    epoch_fn = compile_epoch(carry, shardings, mesh, env, nets, optimizer, dims, args)
    compile_seconds = time.time() - compile_start
    evaluate_policy = make_evaluator(eval_env, nets, args)
    start_time = time.time() - wall_offset
    carry = run_prefill(carry, shardings, env, dims, args)  # a resume refills it too
    if checkpoint is None:
        env_steps += prefill_unrolls(args) * args.unroll_length * args.num_envs

    # ---- the loop: one jitted epoch (collect + update), then evaluate, log, checkpoint ----
    log = RunLog(args, run_path, start_epoch, args.num_epochs)
    for epoch in log.epochs:
        epoch_start = time.time()
        carry, train_metrics = epoch_fn(carry)
        train_metrics = epoch_metrics(jax.device_get(train_metrics))
        epoch_seconds = time.time() - epoch_start
        env_steps += env_steps_per_epoch
        log.check_finite(train_metrics, epoch)
        eval_metrics = evaluate_policy(carry["train_state"]["params"]["actor"], jax.random.fold_in(k_eval_base, epoch))
        record = {
            "epoch": epoch,
            "env_steps": env_steps,
            "wall_time": time.time() - start_time,
            "sps": env_steps_per_epoch / epoch_seconds,
            "epoch_seconds": epoch_seconds,
            **({"compile_seconds": compile_seconds} if epoch == start_epoch else {}),
            **{f"training/{k}": v for k, v in train_metrics.items()},
            **{f"eval/{k}": float(v) for k, v in jax.device_get(eval_metrics).items()},
        }
        log.log(record, env_steps, "eval/episode_success")
        save_checkpoint(run_path, args, checkpoint_state(carry), epoch, env_steps, record["wall_time"])
    log.finish(env_steps)
