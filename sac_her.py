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
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

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
    """continue the run stored in this folder (its own args are used; other flags are ignored)"""


SCRIPT = "sac_her"

# ----------------------------------------------------------------------------------------------------
# Networks: the paper's residual tower (lecun-uniform Dense, LayerNorm, swish; blocks of 4 with a skip)
# ----------------------------------------------------------------------------------------------------
LECUN_UNIFORM = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class ResidualBlock(nn.Module):
    """4 x [Dense -> LayerNorm -> swish], then the block input is added back."""

    width: int

    @nn.compact
    def __call__(self, x, _):
        h = x
        for _ in range(4):
            h = nn.swish(nn.LayerNorm()(nn.Dense(self.width, kernel_init=LECUN_UNIFORM)(h)))
        return x + h, None


class ResidualTower(nn.Module):
    """Dense -> LayerNorm -> swish, then depth/4 residual blocks scanned over stacked params.

    nn.scan keeps compile time flat in depth (one traced block whatever the number of blocks)."""

    width: int
    depth: int

    @nn.compact
    def __call__(self, x):
        x = nn.swish(nn.LayerNorm()(nn.Dense(self.width, kernel_init=LECUN_UNIFORM)(x)))
        blocks = nn.scan(ResidualBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=self.depth // 4)
        x, _ = blocks(self.width, name="blocks")(x, None)
        return x


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy pi(a | state, goal); returns (mean, log_std) before the squash."""

    action_dim: int
    width: int
    depth: int

    @nn.compact
    def __call__(self, obs):
        h = ResidualTower(self.width, self.depth)(obs)
        mean = nn.Dense(self.action_dim, kernel_init=LECUN_UNIFORM)(h)
        raw = nn.Dense(self.action_dim, kernel_init=LECUN_UNIFORM)(h)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(raw) + 1.0)
        return mean, log_std


class QNetwork(nn.Module):
    """Q(state, goal, action) -> scalar."""

    width: int
    depth: int

    @nn.compact
    def __call__(self, obs, action):
        h = ResidualTower(self.width, self.depth)(jnp.concatenate([obs, action], axis=-1))
        return nn.Dense(1, kernel_init=LECUN_UNIFORM)(h)[..., 0]


class TwinQ(nn.Module):
    """Two independent Q networks evaluated in one vmapped call; returns [2, batch]."""

    width: int
    depth: int

    @nn.compact
    def __call__(self, obs, action):
        twin = nn.vmap(QNetwork, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=None, out_axes=0, axis_size=2)
        return twin(self.width, self.depth, name="q")(obs, action)


def sample_action(mean, log_std, key):
    """Reparameterised tanh-Gaussian sample and its log-probability (with the tanh correction)."""
    std = jnp.exp(log_std)
    pre_tanh = mean + std * jax.random.normal(key, mean.shape)
    action = jnp.tanh(pre_tanh)
    gauss_log_prob = -0.5 * (((pre_tanh - mean) / std) ** 2 + 2 * log_std + jnp.log(2 * jnp.pi))
    log_prob = jnp.sum(gauss_log_prob - jnp.log(1 - action**2 + 1e-6), axis=-1)
    return action, log_prob


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
    return loss, {"critic_loss": loss, "q_mean": masked_mean(q[0], batch["valid"]),
                  "reward_mean": masked_mean(batch["reward"], batch["valid"])}


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
        params["critic"], target_params["critic"], params["actor"], ts["log_alpha"], batch, k_critic, nets,
        args.discount)
    updates, ts["critic_opt_state"] = optimizer.update(grads, ts["critic_opt_state"], params["critic"])
    params["critic"] = optax.apply_updates(params["critic"], updates)

    (actor_loss, log_prob), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
        params["actor"], params["critic"], ts["log_alpha"], batch, k_actor, nets)
    updates, ts["actor_opt_state"] = optimizer.update(grads, ts["actor_opt_state"], params["actor"])
    params["actor"] = optax.apply_updates(params["actor"], updates)

    entropy_gap = jax.lax.stop_gradient(-log_prob - target_entropy)
    alpha_loss, grad = jax.value_and_grad(lambda la: jnp.exp(la) * jnp.mean(entropy_gap))(ts["log_alpha"])
    updates, ts["alpha_opt_state"] = optimizer.update(grad, ts["alpha_opt_state"], ts["log_alpha"])
    ts["log_alpha"] = optax.apply_updates(ts["log_alpha"], updates)

    target_params["critic"] = soft_update(target_params["critic"], params["critic"], args.tau)
    ts["params"], ts["target_params"] = params, target_params
    metrics.update(actor_loss=actor_loss, alpha_loss=alpha_loss, alpha=jnp.exp(ts["log_alpha"]),
                   entropy=-jnp.mean(log_prob), her_fraction=jnp.mean(batch["relabelled"]))
    return ts, metrics


def build_networks(args: Args, action_size: int):
    """(actor, twin critic) at --depth / --width (tools may import this)."""
    return Actor(action_size, args.width, args.depth), TwinQ(args.width, args.depth)


def deterministic_action(actor, actor_params, obs):
    """Evaluation action: the squashed mean."""
    return jnp.tanh(actor.apply(actor_params, obs)[0])


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
        record = {"obs": env_state.obs, "action": action,
                  "next_achieved": next_state.info["last_obs"][:, jnp.asarray(goal_indices)],
                  "traj_id": env_state.info["traj_id"], "ended": ended,
                  "terminated": ended & (next_state.info["truncation"] == 0)}
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
        env_state, records = collect_unroll(env, random_policy(dims["action_size"]), carry["env_state"], k_collect,
                                            args.unroll_length, dims["goal_indices"])
        return {**carry, "key": key, "env_state": env_state, "buffer": buffer_insert(carry["buffer"], records)}, None

    carry, _ = jax.lax.scan(one, carry, None, length=num_unrolls)
    return carry


def train_epoch(carry: dict, env, nets, optimizer, dims: dict, args: Args, num_train_steps: int,
                batch_sharding=None):
    """`num_train_steps` x (collect an unroll, insert it, `sgd_steps_per_train_step` SGD steps)."""
    target_entropy = -0.5 * dims["action_size"]

    def sgd(train_state_and_buffer, key):
        train_state, buffer = train_state_and_buffer
        k_sample, k_sgd = jax.random.split(key)
        batch = sample_her_batch(buffer, k_sample, args.batch_size, args.her_ratio, args.her_strategy,
                                 dims["state_dim"], dims["goal_reach_thresh"])
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        train_state, metrics = sgd_step(train_state, batch, k_sgd, nets, optimizer, args, target_entropy)
        return (train_state, buffer), metrics

    def train_step(carry, _):
        key, k_collect, k_sgd = jax.random.split(carry["key"], 3)
        policy = explore_policy(nets, carry["train_state"]["params"]["actor"])
        env_state, records = collect_unroll(env, policy, carry["env_state"], k_collect, args.unroll_length,
                                            dims["goal_indices"])
        buffer = buffer_insert(carry["buffer"], records)
        (train_state, buffer), metrics = jax.lax.scan(
            sgd, (carry["train_state"], buffer), jax.random.split(k_sgd, args.sgd_steps_per_train_step))
        new_carry = {"train_state": train_state, "buffer": buffer, "env_state": env_state, "key": key}
        return new_carry, jax.tree_util.tree_map(jnp.mean, metrics)

    carry, metrics = jax.lax.scan(train_step, carry, None, length=num_train_steps)
    return carry, jax.tree_util.tree_map(jnp.mean, metrics)


# ----------------------------------------------------------------------------------------------------
# Input checks, files, checkpoints
# ----------------------------------------------------------------------------------------------------
def fail(message: str):
    """Bad input: one line "error: ..." on stderr (exit code 1), before anything is compiled."""
    raise SystemExit(f"error: {message}")


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
    if args.depth <= 0 or args.depth % 4:
        fail(f"--depth must be a positive multiple of 4 (got {args.depth})")
    for name in ("width", "batch_size", "num_envs", "num_eval_envs", "episode_length", "num_epochs",
                 "unroll_length", "sgd_steps_per_train_step", "replay_size", "min_replay_size"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if not 0.0 < args.discount < 1.0:
        fail(f"--discount must be in (0, 1) (got {args.discount})")
    if not 0.0 < args.tau <= 1.0:
        fail(f"--tau must be in (0, 1] (got {args.tau})")
    if not 0.0 <= args.her_ratio <= 1.0:
        fail(f"--her-ratio must be in [0, 1] (got {args.her_ratio})")
    if args.learning_rate <= 0:
        fail(f"--learning-rate must be positive (got {args.learning_rate})")
    if args.min_replay_size > args.replay_size:
        fail(f"--min-replay-size {args.min_replay_size} exceeds --replay-size {args.replay_size} (steps per env)")
    if args.unroll_length > args.replay_size:
        fail(f"--unroll-length {args.unroll_length} exceeds --replay-size {args.replay_size} (steps per env)")
    if args.num_envs % num_devices:
        fail(f"--num-envs {args.num_envs} is not divisible by the {num_devices} devices")
    if args.batch_size % num_devices:
        fail(f"--batch-size {args.batch_size} is not divisible by the {num_devices} devices")
    if train_steps_per_epoch(args) < 1:
        fail(f"--total-env-steps {args.total_env_steps} leaves no training step per epoch: need at least "
             f"{prefill_unrolls(args) * args.unroll_length * args.num_envs + args.num_epochs * args.num_envs * args.unroll_length}")


def write_atomic(path: str, data: bytes):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def to_numpy(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def save_checkpoint(run_path: str, carry: dict, args: Args, epoch: int, env_steps: int, wall_time: float):
    """checkpoint.pkl: params as nested dicts of numpy arrays; targets, optimisers, env state as leaves."""
    train_state = to_numpy(carry["train_state"])
    rest = {k: v for k, v in train_state.items() if k != "params"}
    checkpoint = {
        "script": SCRIPT,
        "args": dataclasses.asdict(args),
        "params": train_state["params"],
        "epoch": epoch,
        "env_steps": env_steps,
        "wall_time": wall_time,
        "_opt_state_leaves": jax.tree_util.tree_leaves(rest),
        "_env_state_leaves": jax.tree_util.tree_leaves(to_numpy(carry["env_state"])),
        "_key": np.asarray(jax.device_get(carry["key"])),
    }
    write_atomic(os.path.join(run_path, "checkpoint.pkl"), pickle.dumps(checkpoint, protocol=4))


def load_checkpoint(path: str) -> dict:
    """Reads checkpoint.pkl (path: the file or its run folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pkl")
    with open(path, "rb") as f:
        return pickle.load(f)


def versions() -> dict:
    from importlib import metadata

    out = {name: metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax", "brax", "mujoco")}
    out["python"] = sys.version.split()[0]
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


# ----------------------------------------------------------------------------------------------------
# Main: set up, then one host iteration per epoch (evaluate, log, checkpoint)
# ----------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    resume_path = args.resume
    if resume_path is not None:
        if not os.path.isfile(os.path.join(resume_path, "checkpoint.pkl")):
            fail(f"--resume {resume_path}: no checkpoint.pkl there")
        checkpoint = load_checkpoint(resume_path)
        if checkpoint.get("script") != SCRIPT:
            fail(f"--resume {resume_path}: not a {SCRIPT} run")
        args = Args(**{**checkpoint["args"], "resume": resume_path})

    import envs

    check_args(args, envs.ENV_IDS, jax.device_count())
    eval_env_id = args.eval_env or envs.eval_variant(args.env)
    if resume_path is None:
        run_name = args.run_name or f"{args.env}__{SCRIPT}__d{args.depth}__s{args.seed}__{int(time.time())}"
        run_path = os.path.join(args.run_dir, run_name)
        if os.path.exists(os.path.join(run_path, "checkpoint.pkl")):
            fail(f"{run_path} already holds a run; use --resume {run_path}")
        os.makedirs(run_path, exist_ok=True)
        config = {"script": SCRIPT, "args": dataclasses.asdict(args), "versions": versions(),
                  "git_commit": git_commit()}
        write_atomic(os.path.join(run_path, "config.json"), json.dumps(config, indent=2).encode())
    else:
        run_path = resume_path
        run_name = os.path.basename(os.path.normpath(run_path))

    # ---- environments, networks, state ----
    raw_env = envs.make(args.env)
    env = envs.wrap_for_training(raw_env, episode_length=args.episode_length,
                                 cached_reset=args.cached_reset)
    eval_env = envs.make(eval_env_id)
    dims = {"state_dim": raw_env.state_dim, "goal_indices": tuple(int(i) for i in raw_env.goal_indices),
            "action_size": raw_env.action_size, "goal_reach_thresh": float(raw_env.goal_reach_thresh)}
    nets = build_networks(args, raw_env.action_size)
    optimizer = optax.adam(args.learning_rate)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    num_train_steps = train_steps_per_epoch(args)
    env_steps_per_epoch = num_train_steps * args.num_envs * args.unroll_length
    prefill_steps = prefill_unrolls(args) * args.unroll_length * args.num_envs

    key = jax.random.PRNGKey(args.seed)
    key, k_init, k_reset, k_eval_base = jax.random.split(key, 4)

    @jax.jit
    def initial_carry(k_init, k_reset, key):
        return {
            "train_state": init_train_state(k_init, nets, optimizer, raw_env.observation_size, raw_env.action_size),
            "buffer": buffer_init(args.replay_size, args.num_envs, raw_env.observation_size, raw_env.action_size,
                                  len(dims["goal_indices"])),
            "env_state": env.reset(jax.random.split(k_reset, args.num_envs)),
            "key": key,
        }

    carry = initial_carry(k_init, k_reset, key)
    shardings = carry_shardings(carry, mesh, args.num_envs)
    start_epoch, env_steps, wall_offset = 0, 0, 0.0
    if resume_path is not None:  # the replay buffer is not saved: it is refilled by the prefill below
        rest = {k: v for k, v in carry["train_state"].items() if k != "params"}
        rest = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(rest), checkpoint["_opt_state_leaves"])
        carry["train_state"] = {"params": checkpoint["params"], **rest}
        carry["env_state"] = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(carry["env_state"]), checkpoint["_env_state_leaves"])
        carry["key"] = checkpoint["_key"]
        start_epoch, env_steps, wall_offset = checkpoint["epoch"] + 1, checkpoint["env_steps"], checkpoint["wall_time"]
    carry = jax.device_put(carry, shardings)

    compile_start = time.time()
    epoch_fn = jax.jit(
        lambda c: train_epoch(c, env, nets, optimizer, dims, args, num_train_steps, batch_sharding),
        in_shardings=(shardings,), out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    ).lower(carry).compile()
    compile_seconds = time.time() - compile_start
    prefill_fn = jax.jit(lambda c: prefill(c, env, dims, args, prefill_unrolls(args)),
                         in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)

    @jax.jit
    def evaluate_policy(actor_params, key):
        act = lambda obs: deterministic_action(nets[0], actor_params, obs)  # noqa: E731
        return envs.evaluate(eval_env, act, key, args.num_eval_envs, args.episode_length)

    start_time = time.time() - wall_offset
    carry = prefill_fn(carry)
    if resume_path is None:
        env_steps += prefill_steps

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=run_name, id=run_name,
                   resume="allow", config=dataclasses.asdict(args))
    from tqdm import tqdm

    metrics_file = os.path.join(run_path, "metrics.jsonl")
    eval_history: list[dict] = []
    if resume_path is not None and os.path.isfile(metrics_file):
        with open(metrics_file) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        lines = [m for m in lines if not m.get("summary") and m["epoch"] < start_epoch]
        eval_history = [{k: v for k, v in m.items() if k.startswith("eval/")} for m in lines]
        write_atomic(metrics_file, "".join(json.dumps(m) + "\n" for m in lines).encode())

    progress = tqdm(range(start_epoch, args.num_epochs), initial=start_epoch, total=args.num_epochs,
                    desc=run_name, dynamic_ncols=True)
    for epoch in progress:
        epoch_start = time.time()
        carry, train_metrics = epoch_fn(carry)
        train_metrics = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
        epoch_seconds = time.time() - epoch_start
        env_steps += env_steps_per_epoch
        bad = [k for k, v in train_metrics.items() if k.endswith("loss") and not math.isfinite(v)]
        if bad:
            progress.close()
            print(f"error: non-finite {', '.join(bad)} in epoch {epoch}; stopped. The last good checkpoint "
                  f"is {os.path.join(run_path, 'checkpoint.pkl')} (epoch {epoch - 1})", file=sys.stderr)
            raise SystemExit(1)
        eval_metrics = evaluate_policy(carry["train_state"]["params"]["actor"], jax.random.fold_in(k_eval_base, epoch))
        eval_metrics = {f"eval/{k}": float(v) for k, v in jax.device_get(eval_metrics).items()}
        eval_history.append(eval_metrics)
        record = {"epoch": epoch, "env_steps": env_steps, "wall_time": time.time() - start_time,
                  "sps": env_steps_per_epoch / epoch_seconds, "epoch_seconds": epoch_seconds,
                  **({"compile_seconds": compile_seconds} if epoch == start_epoch else {}),
                  **{f"training/{k}": v for k, v in train_metrics.items()}, **eval_metrics}
        with open(metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if args.track:
            wandb.log(record, step=env_steps)
        save_checkpoint(run_path, carry, args, epoch, env_steps, record["wall_time"])
        progress.set_postfix(sps=f"{record['sps']:.0f}", success=f"{eval_metrics['eval/episode_success']:.1f}")

    last5 = eval_history[-5:]
    summary = {"summary": True, "epochs": len(eval_history), "env_steps": env_steps,
               **{f"{k}_last5": float(np.mean([m[k] for m in last5])) for k in (last5[0] if last5 else {})}}
    with open(metrics_file, "a") as f:
        f.write(json.dumps(summary) + "\n")
    write_atomic(os.path.join(run_path, "summary.json"), json.dumps(summary, indent=2).encode())
    if args.track:
        wandb.summary.update(summary)
        wandb.finish()
    print(json.dumps(summary))
