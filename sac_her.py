"""SAC with hindsight experience replay (HER) on the goal-conditioned benchmark, deep residual nets.

The paper's SAC / SAC+HER baselines (Fig. 12) with the same depth-scalable residual tower as crl_deep.py
(Fig. 13). Sparse reward: 1 when the achieved goal of the next state is within the env's success radius
of the goal. `--her-ratio 0` is plain SAC.

    python sac_her.py --env reacher --depth 4 --total-env-steps 1000000
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import time
from typing import Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from brax.envs.base import Wrapper

import envs


@dataclasses.dataclass
class Args:
    env: str = "reacher"
    """training environment id (one of envs.ENV_IDS)"""
    eval_env: Optional[str] = None
    """evaluation environment id; default: the `_eval` variant of --env where one exists, else --env"""
    depth: int = 4
    """Dense layers inside the residual blocks of actor and critics (a positive multiple of 4)"""
    width: int = 256
    """hidden width of every Dense layer"""
    num_envs: int = 256
    """parallel training environments"""
    num_eval_envs: int = 128
    """parallel evaluation episodes per epoch"""
    total_env_steps: int = 10_000_000
    """environment steps to collect in training (prefill excluded)"""
    num_epochs: int = 50
    """evaluate, log and checkpoint this many times over the run"""
    episode_length: int = 1000
    """steps per episode (training and evaluation)"""
    unroll_length: int = 62
    """steps each env collects between two rounds of SGD updates"""
    updates_per_unroll: int = 64
    """SGD steps (critic + actor + temperature) after each unroll"""
    batch_size: int = 256
    """transitions per SGD step"""
    buffer_size: int = 10_000
    """replay capacity in steps per env (a ring buffer)"""
    min_replay_size: int = 1_000
    """steps per env collected with uniform random actions before training starts"""
    discount: float = 0.9
    """discount factor of the TD target (the benchmark's SAC default)"""
    learning_rate: float = 1e-4
    """Adam learning rate of actor, critics and temperature"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    her_strategy: Literal["future", "final"] = "future"
    """hindsight goal: a uniformly drawn later state of the episode, or its last state in the buffer"""
    her_ratio: float = 0.8
    """fraction of sampled transitions whose goal is relabelled (0 = plain SAC)"""
    cached_reset: bool = False
    """reproduce brax's AutoResetWrapper (one start and goal per env for the whole run)"""
    seed: int = 0
    """random seed"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project: str = "deep-gcrl"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user)"""
    run_dir: str = "runs"
    """parent folder of the run folder"""
    run_name: Optional[str] = None
    """run folder name; default {env}__sac_her__d{depth}__s{seed}__{unix time}"""
    resume: Optional[str] = None
    """checkpoint.pkl (or its run folder) to continue from; the replay buffer is refilled"""


SCRIPT = "sac_her"


def check_args(args: Args) -> None:
    """Rejects bad input before anything is compiled (one line on stderr, exit code 2)."""
    problems = []
    if args.env not in envs.ENV_IDS:
        problems.append(f"unknown --env {args.env!r}; valid ids: {', '.join(envs.ENV_IDS)}")
    if args.eval_env is not None and args.eval_env not in envs.ENV_IDS:
        problems.append(f"unknown --eval-env {args.eval_env!r}; valid ids: {', '.join(envs.ENV_IDS)}")
    if args.depth <= 0 or args.depth % 4:
        problems.append(f"--depth must be a positive multiple of 4, got {args.depth}")
    for name in ("width", "num_envs", "num_eval_envs", "total_env_steps", "num_epochs", "episode_length",
                 "unroll_length", "updates_per_unroll", "batch_size", "buffer_size", "min_replay_size"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.min_replay_size >= args.buffer_size:
        problems.append(f"--min-replay-size ({args.min_replay_size}) must be below --buffer-size ({args.buffer_size})")
    if not 0.0 <= args.her_ratio <= 1.0:
        problems.append(f"--her-ratio must be in [0, 1], got {args.her_ratio}")
    if not 0.0 < args.discount < 1.0:
        problems.append(f"--discount must be in (0, 1), got {args.discount}")
    if not 0.0 < args.tau <= 1.0:
        problems.append(f"--tau must be in (0, 1], got {args.tau}")
    if args.learning_rate <= 0:
        problems.append(f"--learning-rate must be positive, got {args.learning_rate}")
    if args.total_env_steps < args.num_epochs * args.num_envs * args.unroll_length:
        problems.append(f"--total-env-steps ({args.total_env_steps}) is below one unroll per epoch "
                        f"(num_epochs * num_envs * unroll_length = {args.num_epochs * args.num_envs * args.unroll_length})")
    if args.resume is not None and not os.path.exists(args.resume):
        problems.append(f"--resume path {args.resume!r} does not exist")
    if problems:
        raise SystemExit("error: " + problems[0])


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
    env_idx = jax.random.randint(k_env, (batch_size,), 0, num_envs)
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
# Losses and one SGD step (critic, then actor, then temperature, then the target critics)
# ----------------------------------------------------------------------------------------------------
def td_target(reward, bootstrap, next_value, discount):
    """r + discount * V(s'), with V(s') dropped where the episode terminated (bootstrap = 0)."""
    return reward + discount * bootstrap * next_value


def soft_update(target_params, online_params, tau):
    """Polyak averaging: target <- (1 - tau) * target + tau * online."""
    return jax.tree_util.tree_map(lambda t, o: (1.0 - tau) * t + tau * o, target_params, online_params)


def masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sac_critic_loss(critic_params, target_critic_params, actor_params, log_alpha, batch, key, actor, critic, discount):
    """Squared TD error of both critics against min of the target critics minus alpha * log pi (soft value)."""
    next_action, next_log_prob = sample_action(*actor.apply(actor_params, batch["next_obs"]), key)
    next_q = jnp.min(critic.apply(target_critic_params, batch["next_obs"], next_action), axis=0)
    next_value = next_q - jnp.exp(log_alpha) * next_log_prob
    target = jax.lax.stop_gradient(td_target(batch["reward"], batch["bootstrap"], next_value, discount))
    q = critic.apply(critic_params, batch["obs"], batch["action"])
    loss = masked_mean(0.5 * jnp.sum((q - target[None]) ** 2, axis=0), batch["valid"])
    return loss, {"critic_loss": loss, "q_mean": masked_mean(q[0], batch["valid"]),
                  "reward_mean": masked_mean(batch["reward"], batch["valid"])}


def sac_actor_loss(actor_params, critic_params, log_alpha, batch, key, actor, critic):
    """alpha * log pi(a|s,g) - min_i Q_i(s, g, a) with a ~ pi reparameterised."""
    action, log_prob = sample_action(*actor.apply(actor_params, batch["obs"]), key)
    q = jnp.min(critic.apply(critic_params, batch["obs"], action), axis=0)
    loss = jnp.mean(jnp.exp(log_alpha) * log_prob - q)
    return loss, log_prob


def sac_update(train_state, batch, key, actor, critic, optimizer, discount, tau, target_entropy):
    """One SGD step on a batch; returns the new train state and scalar metrics."""
    k_critic, k_actor = jax.random.split(key)
    ts = dict(train_state)
    (_, metrics), grads = jax.value_and_grad(sac_critic_loss, has_aux=True)(
        ts["critic"], ts["target_critic"], ts["actor"], ts["log_alpha"], batch, k_critic, actor, critic, discount)
    updates, ts["critic_opt"] = optimizer.update(grads, ts["critic_opt"], ts["critic"])
    ts["critic"] = optax.apply_updates(ts["critic"], updates)

    (actor_loss, log_prob), grads = jax.value_and_grad(sac_actor_loss, has_aux=True)(
        ts["actor"], ts["critic"], ts["log_alpha"], batch, k_actor, actor, critic)
    updates, ts["actor_opt"] = optimizer.update(grads, ts["actor_opt"], ts["actor"])
    ts["actor"] = optax.apply_updates(ts["actor"], updates)

    entropy_gap = jax.lax.stop_gradient(-log_prob - target_entropy)
    alpha_loss, grad = jax.value_and_grad(lambda la: jnp.exp(la) * jnp.mean(entropy_gap))(ts["log_alpha"])
    updates, ts["alpha_opt"] = optimizer.update(grad, ts["alpha_opt"], ts["log_alpha"])
    ts["log_alpha"] = optax.apply_updates(ts["log_alpha"], updates)

    ts["target_critic"] = soft_update(ts["target_critic"], ts["critic"], tau)
    metrics.update(actor_loss=actor_loss, alpha_loss=alpha_loss, alpha=jnp.exp(ts["log_alpha"]),
                   entropy=-jnp.mean(log_prob), her_fraction=jnp.mean(batch["relabelled"]))
    return ts, metrics


def make_networks(action_dim, width, depth):
    """The actor and the twin critic used by this script (tools may import this)."""
    return Actor(action_dim, width, depth), TwinQ(width, depth)


def init_train_state(key, actor, critic, optimizer, obs_size, action_size):
    k_actor, k_critic = jax.random.split(key)
    obs, action = jnp.zeros((1, obs_size)), jnp.zeros((1, action_size))
    actor_params = actor.init(k_actor, obs)
    critic_params = critic.init(k_critic, obs, action)
    log_alpha = jnp.zeros((), jnp.float32)
    return {"actor": actor_params, "critic": critic_params, "target_critic": jax.tree_util.tree_map(jnp.copy, critic_params), "log_alpha": log_alpha,
            "actor_opt": optimizer.init(actor_params), "critic_opt": optimizer.init(critic_params),
            "alpha_opt": optimizer.init(log_alpha)}


# ----------------------------------------------------------------------------------------------------
# Environment plumbing, files
# ----------------------------------------------------------------------------------------------------
class RecordNextObs(Wrapper):
    """Keeps the observation reached by each step in info['next_obs'] before the auto-reset replaces it.

    The relabelled reward needs the achieved goal of the state a step ends in, also on the last step of
    an episode. Only `step` writes the key (the training wrapper copies the env's reset info over ended
    envs, which would overwrite it); `add_next_obs` seeds it after the batched reset."""

    def step(self, state, action):
        state = self.env.step(state, action)
        return state.replace(info={**state.info, "next_obs": state.obs})


def add_next_obs(state):
    return state.replace(info={**state.info, "next_obs": state.obs})


def versions():
    import brax
    import flax
    import jaxlib
    import mujoco
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "brax": brax.__version__, "mujoco": mujoco.__version__,
            "python": sys.version.split()[0]}


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_atomic(path, data: bytes):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def to_numpy(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def load_checkpoint(path):
    """Reads checkpoint.pkl (or the one inside a run folder) into a dict of numpy arrays / scalars."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pkl")
    with open(path, "rb") as f:
        return pickle.load(f)


def save_checkpoint(path, args, train_state, key, epoch, env_steps, wall_time):
    """params = the acting/evaluated networks; the rest (targets, optimisers, key) lets --resume continue."""
    ts = to_numpy(train_state)
    state = {
        "script": SCRIPT, "args": dataclasses.asdict(args), "epoch": epoch, "env_steps": env_steps,
        "wall_time": wall_time, "params": {"actor": ts["actor"], "critic": ts["critic"]},
        "target_params": {"critic": ts["target_critic"]}, "log_alpha": ts["log_alpha"],
        "opt_state_leaves": {k: jax.tree_util.tree_leaves(ts[k]) for k in ("actor_opt", "critic_opt", "alpha_opt")},
        "key": np.asarray(key),
    }
    write_atomic(path, pickle.dumps(state))


def restore_train_state(checkpoint, template):
    """Rebuilds the train state dict from a checkpoint, using a freshly initialised one for the tree shapes."""
    ts = dict(template)
    ts["actor"] = checkpoint["params"]["actor"]
    ts["critic"] = checkpoint["params"]["critic"]
    ts["target_critic"] = checkpoint["target_params"]["critic"]
    ts["log_alpha"] = checkpoint["log_alpha"]
    for k, leaves in checkpoint["opt_state_leaves"].items():
        ts[k] = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template[k]), leaves)
    return jax.tree_util.tree_map(jnp.asarray, ts)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    checkpoint = None
    if args.resume is not None:
        checkpoint = load_checkpoint(args.resume)
        if checkpoint.get("script") != SCRIPT:
            raise SystemExit(f"error: --resume {args.resume!r} is not a {SCRIPT} checkpoint")
        run_path = os.path.dirname(os.path.abspath(os.path.join(args.resume, "checkpoint.pkl")
                                                   if os.path.isdir(args.resume) else args.resume))
        args = Args(**{**checkpoint["args"], "resume": args.resume})
    else:
        run_name = args.run_name or f"{args.env}__{SCRIPT}__d{args.depth}__s{args.seed}__{int(time.time())}"
        run_path = os.path.join(args.run_dir, run_name)
        if os.path.exists(os.path.join(run_path, "checkpoint.pkl")):
            raise SystemExit(f"error: run folder {run_path!r} already holds a checkpoint; use --resume or another --run-name")
        os.makedirs(run_path, exist_ok=True)
        write_atomic(os.path.join(run_path, "config.json"), json.dumps(
            {"script": SCRIPT, "args": dataclasses.asdict(args), "versions": versions(), "git_commit": git_commit()},
            indent=2).encode())

    env = envs.make(args.env)
    eval_env = envs.make(args.eval_env or envs.eval_variant(args.env))
    train_env = envs.wrap_for_training(RecordNextObs(env), episode_length=args.episode_length,
                                       cached_reset=args.cached_reset)
    state_dim, goal_indices = env.state_dim, jnp.asarray(env.goal_indices)
    obs_size, action_size = env.observation_size, env.action_size
    steps_per_unroll = args.num_envs * args.unroll_length
    unrolls_per_epoch = args.total_env_steps // (args.num_epochs * steps_per_unroll)
    env_steps_per_epoch = unrolls_per_epoch * steps_per_unroll

    actor, critic = make_networks(action_size, args.width, args.depth)
    optimizer = optax.adam(args.learning_rate)
    key = jax.random.PRNGKey(args.seed)
    key, k_init, k_env = jax.random.split(key, 3)
    train_state = init_train_state(k_init, actor, critic, optimizer, obs_size, action_size)
    start_epoch, env_steps, wall_offset = 0, 0, 0.0
    if checkpoint is not None:
        train_state = restore_train_state(checkpoint, train_state)
        key = jnp.asarray(checkpoint["key"], jnp.uint32)
        key, k_env = jax.random.split(key)
        start_epoch, env_steps, wall_offset = checkpoint["epoch"] + 1, checkpoint["env_steps"], checkpoint["wall_time"]

    def collect(env_state, actor_params, key, random_actions):
        """Steps every env `unroll_length` times; returns the new env state and time-major records."""

        def one_step(carry, _):
            env_state, key = carry
            key, k_act = jax.random.split(key)
            if random_actions:
                action = jax.random.uniform(k_act, (args.num_envs, action_size), minval=-1.0, maxval=1.0)
            else:
                action, _ = sample_action(*actor.apply(actor_params, env_state.obs), k_act)
            next_state = train_env.step(env_state, action)
            ended = next_state.done > 0
            record = {"obs": env_state.obs, "action": action,
                      "next_achieved": next_state.info["next_obs"][:, goal_indices],
                      "traj_id": env_state.info["traj_id"], "ended": ended,
                      "terminated": ended & (next_state.info["truncation"] == 0)}
            return (next_state, key), record

        (env_state, _), records = jax.lax.scan(one_step, (env_state, key), None, length=args.unroll_length)
        return env_state, records

    @jax.jit
    def prefill(env_state, buffer, key):
        def one_unroll(carry, _):
            env_state, buffer, key = carry
            key, k_collect = jax.random.split(key)
            env_state, records = collect(env_state, None, k_collect, random_actions=True)
            return (env_state, buffer_insert(buffer, records), key), None

        num_unrolls = -(-args.min_replay_size // args.unroll_length)
        (env_state, buffer, _), _ = jax.lax.scan(one_unroll, (env_state, buffer, key), None, length=num_unrolls)
        return env_state, buffer

    target_entropy = -0.5 * action_size

    def train_epoch(train_state, env_state, buffer, key):
        """unrolls_per_epoch x [collect one unroll, insert, updates_per_unroll SGD steps], all on device."""

        def one_unroll(carry, _):
            train_state, env_state, buffer, key = carry
            key, k_collect, k_update = jax.random.split(key, 3)
            env_state, records = collect(env_state, train_state["actor"], k_collect, random_actions=False)
            buffer = buffer_insert(buffer, records)

            def one_update(carry, _):
                train_state, key = carry
                key, k_sample, k_sgd = jax.random.split(key, 3)
                batch = sample_her_batch(buffer, k_sample, args.batch_size, args.her_ratio, args.her_strategy,
                                         state_dim, env.goal_reach_thresh)
                train_state, metrics = sac_update(train_state, batch, k_sgd, actor, critic, optimizer,
                                                  args.discount, args.tau, target_entropy)
                return (train_state, key), metrics

            (train_state, _), metrics = jax.lax.scan(one_update, (train_state, k_update), None,
                                                     length=args.updates_per_unroll)
            return (train_state, env_state, buffer, key), jax.tree_util.tree_map(jnp.mean, metrics)

        (train_state, env_state, buffer, _), metrics = jax.lax.scan(
            one_unroll, (train_state, env_state, buffer, key), None, length=unrolls_per_epoch)
        return train_state, env_state, buffer, jax.tree_util.tree_map(jnp.mean, metrics)

    train_epoch = jax.jit(train_epoch, donate_argnums=(0, 2))  # the env state may alias leaves

    @jax.jit
    def evaluate(actor_params, key):
        act = lambda obs: jnp.tanh(actor.apply(actor_params, obs)[0])  # deterministic: the squashed mean
        return envs.evaluate(eval_env, act, key, args.num_eval_envs, args.episode_length)

    wandb_run = None
    if args.track:
        import wandb
        wandb_run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, config=dataclasses.asdict(args),
                               name=os.path.basename(run_path), dir=run_path, resume="allow")

    metrics_path = os.path.join(run_path, "metrics.jsonl")
    eval_history = []
    if checkpoint is not None and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        eval_history = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows
                        if not r.get("summary") and r["epoch"] < start_epoch]
        write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows
                                           if not r.get("summary") and r["epoch"] < start_epoch).encode())

    start = time.time() - wall_offset
    env_state = add_next_obs(train_env.reset(jax.random.split(k_env, args.num_envs)))
    buffer = buffer_init(args.buffer_size, args.num_envs, obs_size, action_size, len(env.goal_indices))
    key, k_prefill = jax.random.split(key)
    env_state, buffer = prefill(env_state, buffer, k_prefill)

    for epoch in range(start_epoch, args.num_epochs):
        epoch_start = time.time()
        key, k_train, k_eval = jax.random.split(key, 3)
        train_state, env_state, buffer, train_metrics = train_epoch(train_state, env_state, buffer, k_train)
        jax.block_until_ready(train_state)
        epoch_time = time.time() - epoch_start
        env_steps += env_steps_per_epoch
        eval_metrics = {f"eval/{k}": float(v) for k, v in evaluate(train_state["actor"], k_eval).items()}
        eval_history.append(eval_metrics)
        row = {"epoch": epoch, "env_steps": env_steps, "wall_time": time.time() - start,
               "sps": env_steps_per_epoch / epoch_time,
               **{f"training/{k}": float(v) for k, v in train_metrics.items()}, **eval_metrics}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if wandb_run is not None:
            wandb_run.log(row, step=env_steps)
        print(f"epoch {epoch} steps {env_steps} sps {row['sps']:.0f} "
              f"eval/episode_success {eval_metrics['eval/episode_success']:.2f}", flush=True)
        save_checkpoint(os.path.join(run_path, "checkpoint.pkl"), args, train_state, key, epoch, env_steps,
                        time.time() - start)

    last5 = eval_history[-5:]
    summary = {"summary": True, **{f"{k}_last5": float(np.mean([e[k] for e in last5])) for k in last5[0]}}
    with open(metrics_path, "a") as f:
        f.write(json.dumps(summary) + "\n")
    write_atomic(os.path.join(run_path, "summary.json"), json.dumps(summary, indent=2).encode())
    if wandb_run is not None:
        wandb_run.summary.update(summary)
        wandb_run.finish()
