"""Goal-conditioned behaviour cloning (GCBC offline, GCSL online) with the paper's deep residual tower.

The policy maximises the likelihood of the action taken in s_t given the goal reached later in the same
trajectory, goal = s_{t+k}[goal_indices], k >= 1 (uniform over the rest of the trajectory, or geometric).

    python gcbc.py --mode offline --dataset data/antmaze-medium-stitch-v0.npz --env antmaze-medium-stitch-v0
    python gcbc.py --mode offline --dataset data/antmaze-giant-navigate-v0.npz \
        --env antmaze-giant-navigate-v0 --no-goal                    # plain BC: the policy never sees the goal
    python gcbc.py --mode offline --dataset runs/<run>/buffer.npz --env reacher   # a dataset of our own envs
    python gcbc.py --mode online --env ant_u4_maze                   # GCSL: collect, relabel, clone, repeat
    python gcbc.py ... --dry-run                                      # compile, print the costs, no run

Offline, `--env` is an OGBench dataset id or one of our envs/ ids. OGBench: the dataset's `observations`
are OGBench observations, the goal is a whole observation, evaluation runs OGBench's 5 tasks of `--env`
(as offline_crl.py), and the defaults are OGBench's GCBC settings (batch 1024, width 512, 1M steps).
Our envs: `observations` are the state part of the `--env` observation (state_dim wide; the goal is a
slice of a state). `terminals` is 1 on the last row of each trajectory; a `-val.npz` twin beside the
dataset gives validation losses. Evaluation always runs the deterministic policy (the Gaussian mean); on
our envs with `envs.evaluate` on `--eval-env` (default: --env's eval variant).
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
    mode: Literal["online", "offline"] = "online"
    """online: GCSL (collect with the policy, relabel in hindsight, clone); offline: GCBC on --dataset"""
    dataset: Optional[str] = None
    """offline: OGBench-format .npz with observations (states), actions, terminals"""
    env: str = "humanoid_u_maze"
    """environment id: one of envs.ENV_IDS (trained and evaluated on online; evaluated on offline) or, offline,
    an OGBench dataset id (e.g. antmaze-medium-stitch-v0; evaluated on its 5 tasks)"""
    eval_env: Optional[str] = None
    """envs/ ids only: environment used for evaluation; default: the `_eval` variant of --env where one exists"""
    no_goal: bool = False
    """offline only: plain behaviour cloning, pi(a | state); the goal is dropped from the policy's input"""
    goal_sampling: Literal["uniform_future", "geometric_future"] = "uniform_future"
    """goal of s_t: s_{t+k}, k uniform in 1..(steps left in the trajectory), or P(k) ~ discount^k truncated"""
    discount: float = 0.99
    """gamma of geometric_future goal sampling (unused by uniform_future)"""
    depth: int = 4
    """Dense layers inside the residual blocks of the policy (a positive multiple of 4)"""
    width: Optional[int] = None
    """hidden width of every Dense layer of the tower (default: 512 on OGBench datasets, as OGBench's GCBC; 256)"""
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
    batch_size: Optional[int] = None
    """(state, action, goal) samples per SGD step (default: 1024 on OGBench datasets, as OGBench's GCBC; 256)"""
    learning_rate: float = 3e-4
    """Adam learning rate"""
    train_steps: int = 1_000_000
    """offline: SGD steps in total (split evenly over --num-epochs)"""
    num_epochs: Optional[int] = None
    """epochs; after each one the host evaluates, logs and checkpoints (default: 10 on OGBench datasets, i.e.
    an evaluation every 100k of the 1M steps as OGBench; 100)"""
    num_envs: int = 512
    """online: parallel training environments"""
    num_eval_envs: Optional[int] = None
    """evaluation episodes per epoch: parallel envs, one episode each (default 128); OGBench: episodes per task
    (default 50, as OGBench's GCBC runs)"""
    episode_length: Optional[int] = None
    """steps per episode, training and evaluation (default 1000; OGBench: the env's own limit)"""
    total_env_steps: int = 50_000_000
    """online: environment steps of the whole run, prefill included"""
    unroll_length: int = 62
    """online: steps collected per env before each block of SGD steps"""
    sgd_steps_per_train_step: int = 800
    """online: SGD steps after each collected unroll"""
    replay_size: int = 10_000
    """online: replay capacity in steps PER ENV (a ring buffer of each env's trajectory)"""
    min_replay_size: int = 1_000
    """online: steps per env collected by the initial policy before training starts"""
    cached_reset: bool = False
    """online: reproduce brax's AutoResetWrapper (one start and goal per env for the whole run)"""
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
    """default: {env}__gcbc__d{depth}__s{seed}__{unix time}"""
    resume: Optional[str] = None
    """continue the run stored in this folder with its own settings (flags given again must agree, except
    --track, --wandb-*)"""
    dry_run: bool = False
    """compile the training epoch from shapes, print its parameters, FLOPs, buffer (or dataset) bytes and XLA's
    memory estimate as one JSON line and exit without a run folder (docs/dry_run.md)"""


SCRIPT = "gcbc"
# OGBench's GCBC agent (impls/agents/gcbc.py, get_config; impls/hyperparameters.sh): batch 1024, lr 3e-4, actor
# MLP 512 wide, actor goals uniform over the future states of the same trajectory, 1M steps, evaluated every 100k
# steps with 50 episodes per task. The paper's tower replaces the MLP (--depth 4 is its base network).
OGBENCH_DEFAULTS = {"batch_size": 1024, "width": 512, "num_epochs": 10, "num_eval_envs": 50, "episode_length": None}
OUR_DEFAULTS = {"batch_size": 256, "width": 256, "num_epochs": 100, "num_eval_envs": 128, "episode_length": 1000}


def is_ogbench_run(args: Args, env_ids=None) -> bool:
    """Offline on an OGBench dataset id (anything offline that is not one of our envs/ ids)."""
    if env_ids is None:
        import envs

        env_ids = envs.ENV_IDS
    return args.mode == "offline" and args.env not in env_ids


def resolve(args: Args, env_ids=None) -> Args:
    """Fills the defaults left None: OGBench's GCBC settings on OGBench datasets, this script's otherwise."""
    defaults = OGBENCH_DEFAULTS if is_ogbench_run(args, env_ids) else OUR_DEFAULTS
    return dataclasses.replace(args, **{name: value for name, value in defaults.items() if getattr(args, name) is None})


def is_ogbench_id(name: str) -> bool:
    """A goal-conditioned OGBench dataset id (`<env>-<dataset type>-v<n>`) whose env OGBench registers."""
    splits = name.split("-")
    if len(splits) < 3 or "singletask" in splits or "oraclerep" in splits:
        return False
    try:
        import gymnasium
        import ogbench  # noqa: F401 (registers the OGBench envs with gymnasium)
    except ImportError:
        return False
    return "-".join(splits[:-2] + splits[-1:]) in gymnasium.registry


# ----------------------------------------------------------------------------------------------------
# Network: the paper's residual tower (lecun-uniform Dense, LayerNorm, swish; blocks of 4 with a skip)
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


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class GaussianPolicy(nn.Module):
    """pi(a | state, goal) = N(mean, diag(std^2)), mean = tanh(.) in the action box, log_std in [-5, 2].

    The input is always concat[state, goal]; with `state_dim` set (--no-goal) only the first state_dim
    entries reach the tower, so the output cannot depend on the goal and no weight sees it."""

    tower: Tower
    action_size: int
    state_dim: Optional[int] = None

    @nn.compact
    def __call__(self, obs):
        h = self.tower(obs if self.state_dim is None else obs[..., : self.state_dim])
        mean = jnp.tanh(nn.Dense(self.action_size, kernel_init=kernel_init, name="mean")(h))
        raw = nn.Dense(self.action_size, kernel_init=kernel_init, name="log_std")(h)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(raw) + 1.0)
        return mean, log_std


def build_networks(args: Args, action_size: int, state_dim: Optional[int] = None) -> GaussianPolicy:
    """The policy at --depth / --width (tools may import this); --no-goal needs the state width."""
    if args.no_goal and state_dim is None:
        raise ValueError("--no-goal: build_networks needs state_dim (the policy reads only the state)")
    return GaussianPolicy(make_tower(args, args.depth), action_size, state_dim if args.no_goal else None)


def gaussian_log_prob(mean, log_std, action):
    return jnp.sum(-0.5 * ((action - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def bc_loss_fn(params, policy, batch):
    """Negative log-likelihood of the data action given (state, goal), averaged over valid rows."""
    mean, log_std = policy.apply(params, jnp.concatenate([batch["state"], batch["goal"]], axis=-1))
    nll = -gaussian_log_prob(mean, log_std, batch["action"])
    weight = batch["valid"] / jnp.maximum(jnp.sum(batch["valid"]), 1.0)
    return jnp.sum(weight * nll), {
        "bc_loss": jnp.sum(weight * nll),
        "action_mse": jnp.sum(weight * jnp.mean((mean - batch["action"]) ** 2, axis=-1)),
        "log_std": jnp.mean(log_std),
    }


def sgd_step(train_state, batch, policy, optimizer):
    (_, metrics), grads = jax.value_and_grad(bc_loss_fn, has_aux=True)(train_state["params"]["actor"], policy, batch)
    updates, opt_state = optimizer.update(grads, train_state["opt_state"], train_state["params"]["actor"])
    return {
        "params": {"actor": optax.apply_updates(train_state["params"]["actor"], updates)},
        "opt_state": opt_state,
    }, metrics


def deterministic_action(policy, params, obs):
    """Evaluation action: the Gaussian mean (already in [-1, 1])."""
    return policy.apply(params, obs)[0]


# ----------------------------------------------------------------------------------------------------
# Hindsight goals: an offset k >= 1 into the rest of the same trajectory
# ----------------------------------------------------------------------------------------------------
def sample_goal_offsets(key, horizon, goal_sampling: str, discount: float):
    """k in 1..horizon (horizon = later steps stored in the trajectory): uniform, or P(k) ~ discount^k
    truncated at the horizon (inverse CDF). Rows with horizon 0 get 0 (the caller masks them out)."""
    u = jax.random.uniform(key, horizon.shape)
    h = horizon.astype(jnp.float32)
    if goal_sampling == "uniform_future":
        k = 1.0 + jnp.floor(u * h)
    elif goal_sampling == "geometric_future":
        log_d = math.log(discount)
        k = jnp.ceil(jnp.log1p(-u * (1.0 - jnp.exp(h * log_d))) / log_d)
    else:
        raise ValueError(f"unknown goal_sampling {goal_sampling!r}")
    return jnp.clip(k, jnp.minimum(horizon, 1), horizon).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------
# Offline data: OGBench npz -> rows with their trajectory end
# ----------------------------------------------------------------------------------------------------
def load_dataset(path: str, state_dim: int, action_size: int) -> dict:
    """Reads and checks an OGBench-format npz (offline_crl.py's checks, plus the widths the env needs);
    raises ValueError with one clear line on a bad file.

    Rows after the last terminal (an unfinished trajectory) are dropped; extra keys are ignored. Returns
    observations, actions (clipped to the action box) and, per row, the index of the last row of its
    trajectory (`traj_end`). A terminal row is a goal but never an anchor (its next state is not recorded),
    exactly OGBench's transitions."""
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
    lengths = {k: len(raw[k]) for k in ("observations", "actions", "terminals", "qpos", "qvel") if k in raw}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: mismatched lengths {lengths}")
    if not all(np.issubdtype(raw[k].dtype, np.number) for k in ("observations", "actions", "terminals")):
        raise ValueError(f"{path}: observations, actions and terminals must be numbers")
    if obs.shape[1] != state_dim or actions.shape[1] != action_size:
        raise ValueError(
            f"{path}: observations/actions are {obs.shape[1]}/{actions.shape[1]} wide; the env needs "
            f"states of {state_dim} and actions of {action_size}"
        )
    if not (np.all(np.isfinite(obs)) and np.all(np.isfinite(actions))):
        raise ValueError(f"{path}: observations or actions contain NaN/inf")
    if not np.all((terminals == 0) | (terminals == 1)):
        raise ValueError(f"{path}: terminals must be 0 or 1")
    ends = np.flatnonzero(terminals)
    if len(ends) == 0 or np.max(np.diff(np.concatenate([[-1], ends]))) < 2:
        raise ValueError(f"{path}: no trajectory of 2 or more rows ending in a terminal row")
    n = ends[-1] + 1
    traj_end = ends[np.searchsorted(ends, np.arange(n))]
    return {
        "observations": obs[:n].astype(np.float32),
        "actions": np.clip(actions[:n], -1, 1).astype(np.float32),
        "traj_end": traj_end.astype(np.int32),
    }


def device_dataset(dataset: dict) -> dict:
    """The arrays the jitted sampler reads, with the rows that have a later row in their trajectory."""
    anchor_rows = np.flatnonzero(dataset["traj_end"] > np.arange(len(dataset["traj_end"])))
    print(
        f"dataset: {len(dataset['traj_end'])} rows, {len(np.unique(dataset['traj_end']))} trajectories", file=sys.stderr
    )
    return {
        "observations": jnp.asarray(dataset["observations"]),
        "actions": jnp.asarray(dataset["actions"]),
        "traj_end": jnp.asarray(dataset["traj_end"]),
        "anchor_rows": jnp.asarray(anchor_rows, jnp.int32),
    }


def sample_offline_batch(data, key, batch_size: int, goal_indices, goal_sampling: str, discount: float):
    """Rows t uniform over rows with a later row in their trajectory; goal = state[t+k][goal_indices]."""
    k_row, k_goal = jax.random.split(key)
    t = data["anchor_rows"][jax.random.randint(k_row, (batch_size,), 0, data["anchor_rows"].shape[0])]
    k = sample_goal_offsets(k_goal, data["traj_end"][t] - t, goal_sampling, discount)
    return {
        "state": data["observations"][t],
        "action": data["actions"][t],
        "goal": data["observations"][t + k][:, jnp.asarray(goal_indices)],
        "valid": jnp.ones(batch_size),
    }


# ----------------------------------------------------------------------------------------------------
# Online data (GCSL): a ring of per-env trajectories (time-major), episode ids from the wrapper
# ----------------------------------------------------------------------------------------------------
def buffer_init(capacity: int, num_envs: int, state_dim: int, action_size: int) -> dict:
    """Empty ring buffer. `size` steps per env are valid; the oldest sits at insert_pos - size."""
    return {
        "state": jnp.zeros((capacity, num_envs, state_dim), jnp.float32),
        "action": jnp.zeros((capacity, num_envs, action_size), jnp.float32),
        "traj_id": jnp.zeros((capacity, num_envs), jnp.int32),
        "insert_pos": jnp.zeros((), jnp.int32),
        "size": jnp.zeros((), jnp.int32),
    }


def buffer_insert(buffer: dict, records: dict) -> dict:
    """Writes an unroll ([T, num_envs, ...]) at the ring's head; overwrites the oldest steps."""
    capacity = buffer["state"].shape[0]
    steps = records["state"].shape[0]
    idx = (buffer["insert_pos"] + jnp.arange(steps)) % capacity
    new = {k: buffer[k].at[idx].set(records[k]) for k in ("state", "action", "traj_id")}
    new["insert_pos"] = (buffer["insert_pos"] + steps) % capacity
    new["size"] = jnp.minimum(buffer["size"] + steps, capacity)
    return new


def last_position_of_episode(buffer, env_idx, pos):
    """Chronological position of the last stored step of the episode holding `pos`: episode ids never
    decrease in time within an env, so a binary search (O(log capacity) gathers per sample) finds it."""
    capacity = buffer["traj_id"].shape[0]
    oldest = buffer["insert_pos"] - buffer["size"]
    own = buffer["traj_id"][(oldest + pos) % capacity, env_idx]

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi + 1) // 2
        same = buffer["traj_id"][(oldest + mid) % capacity, env_idx] == own
        return jnp.where(same, mid, lo), jnp.where(same, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(
        0, math.ceil(math.log2(capacity)) + 1, halve, (pos, jnp.full_like(pos, buffer["size"] - 1))
    )
    return lo


def sample_online_batch(buffer, key, batch_size: int, goal_indices, goal_sampling: str, discount: float):
    """(state, action, hindsight goal from a later step of the same episode). Sample i draws its env from
    the i-th contiguous group of envs (each device reads its own envs when sharded); anchors without a
    stored later step in their episode get valid = 0."""
    capacity, num_envs = buffer["traj_id"].shape
    k_env, k_pos, k_goal = jax.random.split(key, 3)
    i = jnp.arange(batch_size)
    group_start = (i * num_envs) // batch_size
    group_size = jnp.maximum(((i + 1) * num_envs) // batch_size - group_start, 1)
    env_idx = group_start + jnp.floor(jax.random.uniform(k_env, (batch_size,)) * group_size).astype(jnp.int32)
    pos = jax.random.randint(k_pos, (batch_size,), 0, buffer["size"])
    horizon = last_position_of_episode(buffer, env_idx, pos) - pos
    k = sample_goal_offsets(k_goal, horizon, goal_sampling, discount)
    oldest = buffer["insert_pos"] - buffer["size"]
    goal_state = buffer["state"][(oldest + pos + k) % capacity, env_idx]
    return {
        "state": buffer["state"][(oldest + pos) % capacity, env_idx],
        "action": buffer["action"][(oldest + pos) % capacity, env_idx],
        "goal": goal_state[:, jnp.asarray(goal_indices)],
        "valid": (horizon > 0).astype(jnp.float32),
    }


def collect_unroll(env, policy, params, env_state, key, unroll_length: int, state_dim: int, random_actions: bool):
    """Steps the batched env with actions sampled from the policy (clipped to the box), or uniform."""

    def step(env_state, key):
        mean, log_std = policy.apply(params, env_state.obs)
        if random_actions:
            action = jax.random.uniform(key, mean.shape, minval=-1.0, maxval=1.0)
        else:
            action = jnp.clip(mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape), -1.0, 1.0)
        record = {
            "state": env_state.obs[:, :state_dim],
            "action": action,
            "traj_id": env_state.info["traj_id"].astype(jnp.int32),
        }
        return env.step(env_state, action), record

    return jax.lax.scan(step, env_state, jax.random.split(key, unroll_length))


def online_epoch(carry, env, policy, optimizer, dims, args: Args, num_train_steps: int, batch_sharding=None):
    """`num_train_steps` x (collect an unroll with the current policy, insert, SGD steps on relabelled data)."""

    def sgd(train_state_and_buffer, key):
        train_state, buffer = train_state_and_buffer
        batch = sample_online_batch(
            buffer, key, args.batch_size, dims["goal_indices"], args.goal_sampling, args.discount
        )
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        train_state, metrics = sgd_step(train_state, batch, policy, optimizer)
        return (train_state, buffer), metrics

    def train_step(carry, _):
        key, k_collect, k_sgd = jax.random.split(carry["key"], 3)
        env_state, records = collect_unroll(
            env,
            policy,
            carry["train_state"]["params"]["actor"],
            carry["env_state"],
            k_collect,
            args.unroll_length,
            dims["state_dim"],
            random_actions=False,
        )
        buffer = buffer_insert(carry["buffer"], records)
        (train_state, buffer), metrics = jax.lax.scan(
            sgd, (carry["train_state"], buffer), jax.random.split(k_sgd, args.sgd_steps_per_train_step)
        )
        new_carry = {"train_state": train_state, "buffer": buffer, "env_state": env_state, "key": key}
        return new_carry, jax.tree_util.tree_map(jnp.mean, metrics)

    carry, metrics = jax.lax.scan(train_step, carry, None, length=num_train_steps)
    return carry, jax.tree_util.tree_map(jnp.mean, metrics)


def online_prefill(carry, env, policy, dims, args: Args, num_unrolls: int):
    """Fills the buffer with `num_unrolls` unrolls of uniform random actions (no updates)."""

    def one(carry, _):
        key, k_collect = jax.random.split(carry["key"])
        env_state, records = collect_unroll(
            env,
            policy,
            carry["train_state"]["params"]["actor"],
            carry["env_state"],
            k_collect,
            args.unroll_length,
            dims["state_dim"],
            random_actions=True,
        )
        return {**carry, "key": key, "env_state": env_state, "buffer": buffer_insert(carry["buffer"], records)}, None

    carry, _ = jax.lax.scan(one, carry, None, length=num_unrolls)
    return carry


def offline_epoch(carry, data, policy, optimizer, dims, args: Args, sgd_steps: int):
    """`sgd_steps` SGD steps on batches drawn from the dataset."""

    def sgd(train_state, key):
        batch = sample_offline_batch(
            data, key, args.batch_size, dims["goal_indices"], args.goal_sampling, args.discount
        )
        return sgd_step(train_state, batch, policy, optimizer)

    key, k_sgd = jax.random.split(carry["key"])
    train_state, metrics = jax.lax.scan(sgd, carry["train_state"], jax.random.split(k_sgd, sgd_steps))
    return {**carry, "train_state": train_state, "key": key}, jax.tree_util.tree_map(jnp.mean, metrics)


def compile_epoch(epoch_body, carry, shardings, mesh: Mesh, *inputs):
    """The whole epoch (online: collect + update; offline: update) as one XLA program, its carry donated.
    `inputs` (offline: the dataset) are further arguments, replicated and not donated: arguments, not
    closed-over constants, so --dry-run can compile the same program from shapes."""
    replicated = NamedSharding(mesh, PartitionSpec())
    in_shardings = (shardings, *(jax.tree_util.tree_map(lambda _: replicated, x) for x in inputs))
    jitted = jax.jit(epoch_body, in_shardings=in_shardings, out_shardings=(shardings, replicated), donate_argnums=0)
    return jitted.lower(carry, *inputs).compile()


def make_ogbench_env(name: str, episode_length: Optional[int]):
    import ogbench

    kwargs = {} if episode_length is None else {"max_episode_steps": episode_length}
    return ogbench.make_env_and_datasets(name, env_only=True, **kwargs)


def evaluate_ogbench(eval_envs, act, seed: int) -> dict:
    """Success rate per task (OGBench's evaluation tasks, ids 1..5), one episode per env in `eval_envs`
    run in lockstep; an episode succeeds if info['success'] is 1 at any step. Seeds are fixed, so
    every evaluation of a run sees the same start noise. (offline_crl.py's loop: same seeds, same metrics.)"""
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


def make_evaluator(eval_env, policy, args: Args):
    """(actor params, key) -> the paper's metrics of the deterministic policy: a jitted envs.evaluate over
    num_eval_envs episodes on our envs; OGBench's 5 tasks, num_eval_envs episodes each, on an OGBench id
    (`eval_env` is then the first of the OGBench envs; the key is unused, the seeds are fixed)."""
    if is_ogbench_run(args):
        eval_envs = [eval_env] + [
            make_ogbench_env(args.env, args.episode_length) for _ in range(args.num_eval_envs - 1)
        ]
        act = jax.jit(
            lambda params, obs, goals: deterministic_action(policy, params, jnp.concatenate([obs, goals], -1))
        )
        return lambda params, key: evaluate_ogbench(eval_envs, lambda o, g: act(params, o, g), args.seed)
    import envs

    def evaluate_policy(actor_params, key):
        act = lambda obs: deterministic_action(policy, actor_params, obs)
        return envs.evaluate(eval_env, act, key, args.num_eval_envs, args.episode_length)

    return jax.jit(evaluate_policy)


# ----------------------------------------------------------------------------------------------------
# Input checks, the run's state on disk
# ----------------------------------------------------------------------------------------------------
def prefill_unrolls(args: Args) -> int:
    return -(-args.min_replay_size // args.unroll_length)


def train_steps_per_epoch(args: Args) -> int:
    """online: collect-and-train iterations per epoch; offline: SGD steps per epoch."""
    if args.mode == "offline":
        return args.train_steps // args.num_epochs
    prefill_steps = prefill_unrolls(args) * args.unroll_length * args.num_envs
    return (args.total_env_steps - prefill_steps) // (args.num_epochs * args.num_envs * args.unroll_length)


def check_args(args: Args, env_ids=None, num_devices: Optional[int] = None):
    """Every bad-input check that needs no file, no env and no compilation; calls `fail` on the first.
    (The dataset file is checked when a run starts: tools/grid.py vets sweeps whose data is elsewhere.)

    env_ids / num_devices default to envs.ENV_IDS / jax.device_count() (tools/grid.py passes args only)."""
    if env_ids is None:
        import envs

        env_ids = envs.ENV_IDS
    num_devices = jax.device_count() if num_devices is None else num_devices
    args = resolve(args, env_ids)
    if args.mode == "online" and args.env not in env_ids:
        fail(f"unknown env {args.env!r}; valid: {', '.join(env_ids)}")
    if args.mode == "offline" and args.env not in env_ids and not is_ogbench_id(args.env):
        fail(
            f"unknown env {args.env!r}: neither one of our envs/ ids ({', '.join(env_ids)}) nor a goal-conditioned "
            "OGBench dataset id (e.g. antmaze-medium-stitch-v0)"
        )
    if args.eval_env is not None and is_ogbench_run(args, env_ids):
        fail("--eval-env is for our envs/ ids; an OGBench run is evaluated on the tasks of --env")
    if args.eval_env is not None and args.eval_env not in env_ids:
        fail(f"unknown eval env {args.eval_env!r}; valid: {', '.join(env_ids)}")
    if args.mode == "offline" and not args.dataset:
        fail("--mode offline needs --dataset PATH.npz")
    if args.mode == "online" and args.dataset:
        fail("--dataset is only read by --mode offline")
    if args.mode == "online" and args.no_goal:
        fail("--no-goal (plain behaviour cloning of a dataset) needs --mode offline; GCSL clones toward goals")
    check_common(args)
    if args.batch_size % num_devices:
        fail(f"--batch-size {args.batch_size} is not divisible by the {num_devices} devices")
    if args.mode == "online" and args.num_envs % num_devices:
        fail(f"--num-envs {args.num_envs} is not divisible by the {num_devices} devices")
    if train_steps_per_epoch(args) < 1:
        needed = (
            prefill_unrolls(args) * args.unroll_length * args.num_envs
            + args.num_epochs * args.num_envs * args.unroll_length
        )
        fail(
            f"--train-steps {args.train_steps} is below --num-epochs {args.num_epochs}"
            if args.mode == "offline"
            else f"--total-env-steps {args.total_env_steps} leaves no training step per epoch: need at least {needed}"
        )


def make_envs(args: Args):
    """(training env or None, evaluation env, dims). dims: state_dim, goal_indices (the goal is
    state[goal_indices]; an OGBench goal is a whole observation), action_size. A bad OGBench id stops
    here with one line, before anything compiles."""
    import envs

    if is_ogbench_run(args):
        try:
            eval_env = make_ogbench_env(args.env, args.episode_length)
        except Exception as e:  # gymnasium raises several types for unknown names
            fail(f"--env {args.env!r}: not an OGBench env ({type(e).__name__}: {e})")
        state_dim = int(np.prod(eval_env.observation_space.shape))
        dims = {"state_dim": state_dim, "goal_indices": tuple(range(state_dim))}
        return None, eval_env, {**dims, "action_size": int(eval_env.action_space.shape[0])}
    raw_env = envs.make(args.env)
    dims = {
        "state_dim": raw_env.state_dim,
        "goal_indices": tuple(int(i) for i in raw_env.goal_indices),
        "action_size": raw_env.action_size,
    }
    return raw_env, envs.make(args.eval_env or envs.eval_variant(args.env)), dims


def load_offline_dataset(args: Args, dims: dict):
    """(the --dataset file, its `-val.npz` twin or None), checked against the env's widths; one line and
    exit on a bad or missing file."""
    if not os.path.isfile(args.dataset):
        fail(f"--dataset {args.dataset!r} does not exist")
    val_path = args.dataset[: -len(".npz")] + "-val.npz" if args.dataset.endswith(".npz") else ""
    try:
        dataset = load_dataset(args.dataset, dims["state_dim"], dims["action_size"])
        val_dataset = (
            load_dataset(val_path, dims["state_dim"], dims["action_size"]) if os.path.isfile(val_path) else None
        )
    except ValueError as e:
        fail(str(e))
    return dataset, val_dataset


def make_validation(policy, dims, args: Args):
    """jit(actor params, data, key) -> the loss metrics on one batch of the -val twin (overfitting shows as
    a gap to training/)."""

    def validation_metrics(actor_params, data, key):
        batch = sample_offline_batch(
            data, key, args.batch_size, dims["goal_indices"], args.goal_sampling, args.discount
        )
        return bc_loss_fn(actor_params, policy, batch)[1]

    return jax.jit(validation_metrics)


def checkpoint_state(carry: dict) -> dict:
    """What a checkpoint holds: the policy params, the optimizer state, the key and (online) the env
    state. The online replay buffer is not saved: a resume refills it."""
    return {
        "params": carry["train_state"]["params"],
        "opt_state": carry["train_state"]["opt_state"],
        "key": carry["key"],
        **({"env_state": carry["env_state"]} if "env_state" in carry else {}),
    }


def carry_shardings(carry: dict, mesh, num_envs: int):
    """Envs and buffer split over the mesh's 'data' axis along the env dimension; the rest replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    out = {k: jax.tree_util.tree_map(lambda _: replicated, v) for k, v in carry.items()}
    if "env_state" in carry:
        by_env = NamedSharding(mesh, PartitionSpec("data"))
        out["env_state"] = jax.tree_util.tree_map(
            lambda x: by_env if x.ndim >= 1 and x.shape[0] == num_envs else replicated, carry["env_state"]
        )
        out["buffer"] = {
            k: NamedSharding(mesh, PartitionSpec(None, "data")) if v.ndim >= 2 else replicated
            for k, v in carry["buffer"].items()
        }
    return out


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


def dry_run(args: Args, raw_env, dims: dict, dataset: Optional[dict]) -> dict:
    """--dry-run: the epoch a real run would compile (from shapes, same donation and shardings), its
    costs printed as one JSON line (dry_run_report). Nothing is initialised, stepped or written."""
    skip_compilation_cache()
    apply_matmul_precision(args)
    import envs

    policy = build_networks(args, dims["action_size"], dims["state_dim"])
    optimizer = optax.adam(args.learning_rate)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    num_train_steps = train_steps_per_epoch(args)
    online = args.mode == "online"
    if online:
        env = envs.wrap_for_training(raw_env, episode_length=args.episode_length, cached_reset=args.cached_reset)

    def make_carry(key):  # as __main__ builds it
        key, k_init, k_reset = jax.random.split(key, 3)
        params = {"actor": policy.init(k_init, jnp.zeros((1, dims["state_dim"] + len(dims["goal_indices"]))))}
        carry = {"train_state": {"params": params, "opt_state": optimizer.init(params["actor"])}, "key": key}
        if online:
            carry["env_state"] = env.reset(jax.random.split(k_reset, args.num_envs))
            carry["buffer"] = buffer_init(args.replay_size, args.num_envs, dims["state_dim"], dims["action_size"])
        return carry

    carry = jax.eval_shape(make_carry, jax.random.PRNGKey(args.seed))
    shardings = carry_shardings(carry, mesh, args.num_envs)
    if online:
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        epoch_body = lambda c: online_epoch(c, env, policy, optimizer, dims, args, num_train_steps, batch_sharding)
        inputs, buffer_bytes = (), tree_bytes(carry["buffer"])
    else:
        with jax.default_device(jax.devices("cpu")[0]):  # the dataset stays off the accelerator
            data = as_shapes(device_dataset(dataset))
        epoch_body = lambda c, d: offline_epoch(c, d, policy, optimizer, dims, args, num_train_steps)
        inputs, buffer_bytes = (data,), tree_bytes(data)
    compile_start = time.time()
    compiled = compile_epoch(epoch_body, carry, shardings, mesh, *inputs)
    compile_seconds = time.time() - compile_start
    params = carry["train_state"]["params"]
    flops = args.batch_size * dense_flops(params["actor"]) * PARAM_GRAD  # BC: one trained pass of the policy
    extra = {"sgd_steps_per_epoch": num_train_steps * (args.sgd_steps_per_train_step if online else 1)}
    return dry_run_report(args, compiled, compile_seconds, params, flops, buffer_bytes, extra)


# ----------------------------------------------------------------------------------------------------
# Main: set up, then one host iteration per epoch (train, evaluate, log, checkpoint)
# ----------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    args = resolve(parse_args())
    import envs

    check_args(args, envs.ENV_IDS, jax.device_count())
    apply_matmul_precision(args)
    raw_env, eval_env, dims = make_envs(args)
    if args.mode == "offline":
        dataset, val_dataset = load_offline_dataset(args, dims)
    if args.dry_run:  # compile, print the costs, exit: no run folder
        dry_run(args, raw_env, dims, dataset if args.mode == "offline" else None)
        sys.exit(0)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    run_path = open_run(args)

    # ---- setup: data or environments, the policy, the optimizer, the initial state, the compiled epoch ----
    policy = build_networks(args, dims["action_size"], dims["state_dim"])
    optimizer = optax.adam(args.learning_rate)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    num_train_steps = train_steps_per_epoch(args)
    key, k_init, k_reset, k_eval_base = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    params = {"actor": policy.init(k_init, jnp.zeros((1, dims["state_dim"] + len(dims["goal_indices"]))))}
    carry = {"train_state": {"params": params, "opt_state": optimizer.init(params["actor"])}, "key": key}
    if args.mode == "online":
        env = envs.wrap_for_training(raw_env, episode_length=args.episode_length, cached_reset=args.cached_reset)
        carry["env_state"] = jax.jit(env.reset)(jax.random.split(k_reset, args.num_envs))
        carry["buffer"] = buffer_init(args.replay_size, args.num_envs, raw_env.state_dim, raw_env.action_size)
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        epoch_body = lambda c: online_epoch(c, env, policy, optimizer, dims, args, num_train_steps, batch_sharding)
        env_steps_per_epoch = num_train_steps * args.num_envs * args.unroll_length
    else:
        data = device_dataset(dataset)
        val_data = device_dataset(val_dataset) if val_dataset is not None else None
        validation_metrics = make_validation(policy, dims, args)
        epoch_body = lambda c, d: offline_epoch(c, d, policy, optimizer, dims, args, num_train_steps)
        env_steps_per_epoch = num_train_steps  # offline: env_steps counts SGD steps (as offline_crl.py), for curves
    epoch_inputs = (data,) if args.mode == "offline" else ()
    start_epoch, env_steps, wall_offset = 0, 0, 0.0
    if checkpoint is not None:  # a checkpoint that does not fit fails here, before any compile
        saved = restore_state(checkpoint_state(carry), checkpoint["state"], args.resume)
        carry.update(train_state={"params": saved["params"], "opt_state": saved["opt_state"]}, key=saved["key"])
        carry.update({"env_state": saved["env_state"]} if args.mode == "online" else {})
        start_epoch, env_steps, wall_offset = checkpoint["epoch"] + 1, checkpoint["env_steps"], checkpoint["wall_time"]
    shardings = carry_shardings(carry, mesh, args.num_envs)
    carry = jax.device_put(carry, shardings)
    compile_start = time.time()
    epoch_fn = compile_epoch(epoch_body, carry, shardings, mesh, *epoch_inputs)
    compile_seconds = time.time() - compile_start
    evaluate_policy = make_evaluator(eval_env, policy, args)
    start_time = time.time() - wall_offset
    if args.mode == "online":  # a resume refills the buffer too
        fill = lambda c: online_prefill(c, env, policy, dims, args, prefill_unrolls(args))
        carry = jax.jit(fill, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)(carry)
        env_steps += prefill_unrolls(args) * args.unroll_length * args.num_envs if checkpoint is None else 0

    # ---- the loop: one jitted epoch (collect +) update, then evaluate, log, checkpoint ----
    log = RunLog(args, run_path, start_epoch, args.num_epochs)
    for epoch in log.epochs:
        epoch_start = time.time()
        carry, train_metrics = epoch_fn(carry, *epoch_inputs)
        train_metrics = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
        epoch_seconds = time.time() - epoch_start
        env_steps += env_steps_per_epoch
        log.check_finite(train_metrics, epoch)
        eval_metrics = evaluate_policy(carry["train_state"]["params"]["actor"], jax.random.fold_in(k_eval_base, epoch))
        sgd_steps = (epoch + 1) * num_train_steps * (args.sgd_steps_per_train_step if args.mode == "online" else 1)
        record = {
            "epoch": epoch,
            "env_steps": env_steps,
            "sgd_steps": sgd_steps,
            "wall_time": time.time() - start_time,
            "sps": env_steps_per_epoch / epoch_seconds,
            "epoch_seconds": epoch_seconds,
            **({"compile_seconds": compile_seconds} if epoch == start_epoch else {}),
            **{f"training/{k}": v for k, v in train_metrics.items()},
            **{f"eval/{k}": float(v) for k, v in jax.device_get(eval_metrics).items()},
        }
        headline = "eval/success" if is_ogbench_run(args) else "eval/episode_success"
        if args.mode == "offline" and val_data is not None:  # its own key: the run's other draws stay as they were
            k_val = jax.random.fold_in(jax.random.PRNGKey(args.seed + 1), epoch)
            val_metrics = validation_metrics(carry["train_state"]["params"]["actor"], val_data, k_val)
            record.update({f"validation/{k}": float(v) for k, v in jax.device_get(val_metrics).items()})
        log.log(record, env_steps if args.mode == "online" else sgd_steps, headline)
        save_checkpoint(run_path, args, checkpoint_state(carry), epoch, env_steps, record["wall_time"])
    log.finish(env_steps)
