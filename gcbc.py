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
import math
import os
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

import runkit


@dataclass(frozen=True)
class Args(runkit.RunFlags):
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


# ---- Network: the paper's residual tower, a Gaussian head ----------------------------------------

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


def deterministic_action(policy, params, obs):
    """Evaluation action: the Gaussian mean (already in [-1, 1])."""
    return policy.apply(params, obs)[0]


# ---- Loss and the SGD step -----------------------------------------------------------------------


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


# ---- Hindsight goals: an offset k >= 1 into the rest of the same trajectory ----------------------


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


# ---- Offline data: an OGBench-format npz (envs.ogbench) as rows with their trajectory's end -------


def load_dataset(path: str, state_dim: int, action_size: int) -> dict:
    """envs.ogbench.load_dataset's checked rows, plus the widths the env needs; raises ValueError with one
    line on a bad file. Returns observations, actions (clipped to the action box), per row the last row of
    its trajectory (`traj_end`) and the anchor rows (those with a later row in their trajectory: a terminal
    row is a goal but never an anchor, exactly OGBench's transitions)."""
    from envs import ogbench

    data = ogbench.load_dataset(path)
    obs, actions = data["observations"], data["actions"]
    if obs.shape[1] != state_dim or actions.shape[1] != action_size:
        raise ValueError(
            f"{path}: observations/actions are {obs.shape[1]}/{actions.shape[1]} wide; the env needs "
            f"states of {state_dim} and actions of {action_size}"
        )
    anchor_rows, traj_end = ogbench.index_trajectories(data["terminals"])
    return {"observations": obs, "actions": np.clip(actions, -1, 1), "traj_end": traj_end, "anchor_rows": anchor_rows}


def device_dataset(dataset: dict) -> dict:
    """The arrays the jitted sampler reads."""
    traj_end = dataset["traj_end"]
    print(f"dataset: {len(traj_end)} rows, {len(np.unique(traj_end))} trajectories", file=sys.stderr)
    return {k: jnp.asarray(dataset[k]) for k in ("observations", "actions", "traj_end", "anchor_rows")}


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


# ---- Online data (GCSL): a ring of per-env trajectories (time-major), episode ids from the wrapper -


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

    iterations = math.ceil(math.log2(capacity)) + 1
    lo, _ = jax.lax.fori_loop(0, iterations, halve, (pos, jnp.full_like(pos, buffer["size"] - 1)))
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


# ---- Collection and the jitted epochs (online: collect + update; offline: update) ----------------


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


def collect_and_insert(carry: dict, env, policy, dims: dict, args: Args, key, random_actions: bool) -> dict:
    """One unroll of the current policy (or of uniform random actions), written into the buffer."""
    actor_params = carry["train_state"]["params"]["actor"]
    env_state, records = collect_unroll(
        env, policy, actor_params, carry["env_state"], key, args.unroll_length, dims["state_dim"], random_actions
    )
    return {**carry, "env_state": env_state, "buffer": buffer_insert(carry["buffer"], records)}


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

    def train_step(carry, step):
        key, k_collect, k_sgd = jax.random.split(carry["key"], 3)
        carry = collect_and_insert(carry, env, policy, dims, args, k_collect, random_actions=False)
        (train_state, buffer), metrics = jax.lax.scan(
            sgd, (carry["train_state"], carry["buffer"]), jax.random.split(k_sgd, args.sgd_steps_per_train_step)
        )
        runkit.progress(step)  # the progress bar moves per training step, from inside the jitted epoch
        new_carry = {"train_state": train_state, "buffer": buffer, "env_state": carry["env_state"], "key": key}
        return new_carry, jax.tree_util.tree_map(jnp.mean, metrics)

    carry, metrics = jax.lax.scan(train_step, carry, jnp.arange(num_train_steps))
    return carry, jax.tree_util.tree_map(jnp.mean, metrics)


def online_prefill(carry, env, policy, dims, args: Args, num_unrolls: int):
    """Fills the buffer with `num_unrolls` unrolls of uniform random actions (no updates)."""

    def one(carry, _):
        key, k_collect = jax.random.split(carry["key"])
        return {**collect_and_insert(carry, env, policy, dims, args, k_collect, random_actions=True), "key": key}, None

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


def run_prefill(carry: dict, shardings, env, policy, dims: dict, args: Args) -> dict:
    """The replay buffer filled by `runkit.prefill_unrolls(args)` unrolls of random actions, in one jitted scan."""
    fill = lambda c: online_prefill(c, env, policy, dims, args, runkit.prefill_unrolls(args))
    return jax.jit(fill, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)(carry)


# ---- Evaluation and validation -------------------------------------------------------------------


def make_evaluator(eval_env, policy, args: Args):
    """(actor params, key) -> the paper's metrics of the deterministic policy: a jitted envs.evaluate over
    num_eval_envs episodes on our envs; OGBench's 5 tasks, num_eval_envs episodes each, on an OGBench id
    (`eval_env` is then the first of the OGBench envs; the key is unused, the seeds are fixed)."""
    if is_ogbench_run(args):
        from envs import ogbench

        eval_envs = [eval_env] + [
            ogbench.make_env(args.env, args.episode_length) for _ in range(args.num_eval_envs - 1)
        ]
        act = jax.jit(
            lambda params, obs, goals: deterministic_action(policy, params, jnp.concatenate([obs, goals], -1))
        )
        return lambda params, key: ogbench.evaluate(eval_envs, lambda o, g: act(params, o, g), args.seed)
    import envs

    def evaluate_policy(actor_params, key):
        act = lambda obs: deterministic_action(policy, actor_params, obs)
        return envs.evaluate(eval_env, act, key, args.num_eval_envs, args.episode_length)

    return jax.jit(evaluate_policy)


def make_validation(policy, dims, args: Args, val_dataset: Optional[dict]):
    """(actor params, epoch) -> {"validation/<loss metric>": float} on one batch of the -val twin (overfitting
    shows as a gap to training/), {} without one. Its own key: the run's other draws stay as they were."""
    if val_dataset is None:
        return lambda actor_params, epoch: {}
    val_data = device_dataset(val_dataset)

    @jax.jit
    def validation_metrics(actor_params, data, key):
        batch = sample_offline_batch(
            data, key, args.batch_size, dims["goal_indices"], args.goal_sampling, args.discount
        )
        return bc_loss_fn(actor_params, policy, batch)[1]

    def validate(actor_params, epoch):
        key = jax.random.fold_in(jax.random.PRNGKey(args.seed + 1), epoch)
        metrics = validation_metrics(actor_params, val_data, key)
        return {f"validation/{k}": v for k, v in runkit.seed_rows(metrics)[0].items()}

    return validate


# ---- The run's schedule, input checks, envs and data, what a checkpoint holds --------------------


def train_steps_per_epoch(args: Args) -> int:
    """online: collect-and-train iterations per epoch (runkit's schedule); offline: SGD steps per epoch."""
    return args.train_steps // args.num_epochs if args.mode == "offline" else runkit.train_steps_per_epoch(args)


def check_args(args: Args, env_ids=None, num_devices: Optional[int] = None):
    """Every bad-input check that needs no file, no env and no compilation; `runkit.fail`s on the first.
    (The dataset file is checked when a run starts: tools/grid.py vets sweeps whose data is elsewhere.)

    env_ids / num_devices default to envs.ENV_IDS / jax.device_count() (tools/grid.py passes args only)."""
    from envs import ogbench

    if env_ids is None:
        import envs

        env_ids = envs.ENV_IDS
    num_devices = jax.device_count() if num_devices is None else num_devices
    args, fail = resolve(args, env_ids), runkit.fail
    if args.mode == "offline" and args.env not in env_ids and not ogbench.is_dataset_id(args.env):
        fail(
            f"unknown env {args.env!r}: neither one of our envs/ ids ({', '.join(env_ids)}) nor a goal-conditioned "
            "OGBench dataset id (e.g. antmaze-medium-stitch-v0)"
        )
    if args.eval_env is not None and is_ogbench_run(args, env_ids):
        fail("--eval-env is for our envs/ ids; an OGBench run is evaluated on the tasks of --env")
    if args.mode == "offline" and not args.dataset:
        fail("--mode offline needs --dataset PATH.npz")
    if args.mode == "online" and args.dataset:
        fail("--dataset is only read by --mode offline")
    if args.mode == "online" and args.no_goal:
        fail("--no-goal (plain behaviour cloning of a dataset) needs --mode offline; GCSL clones toward goals")
    if args.mode == "online":  # env ids, the shared range checks, the split over devices, the schedule
        runkit.check_online(args, env_ids, num_devices)
        return
    if args.eval_env is not None and args.eval_env not in env_ids:
        fail(f"unknown eval env {args.eval_env!r}; valid: {', '.join(env_ids)}")
    runkit.check_common(args)
    if args.batch_size % num_devices:
        fail(f"--batch-size {args.batch_size} is not divisible by the {num_devices} devices")
    if train_steps_per_epoch(args) < 1:
        fail(f"--train-steps {args.train_steps} is below --num-epochs {args.num_epochs}")


def make_envs(args: Args):
    """(training env or None, evaluation env, dims). dims: state_dim, goal_indices (the goal is
    state[goal_indices]; an OGBench goal is a whole observation), action_size. A bad OGBench id stops
    here with one line, before anything compiles."""
    import envs

    if is_ogbench_run(args):
        from envs import ogbench

        try:
            eval_env = ogbench.make_env(args.env, args.episode_length)
        except Exception as e:  # gymnasium raises several types for unknown names
            runkit.fail(f"--env {args.env!r}: not an OGBench env ({type(e).__name__}: {e})")
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
        runkit.fail(f"--dataset {args.dataset!r} does not exist")
    val_path = args.dataset[: -len(".npz")] + "-val.npz" if args.dataset.endswith(".npz") else ""
    try:
        dataset = load_dataset(args.dataset, dims["state_dim"], dims["action_size"])
        val = load_dataset(val_path, dims["state_dim"], dims["action_size"]) if os.path.isfile(val_path) else None
    except ValueError as e:
        runkit.fail(str(e))
    return dataset, val


def checkpoint_state(carry: dict) -> dict:
    """What a checkpoint holds: the policy params, the optimizer state, the key and (online) the env
    state. The online replay buffer is not saved: a resume refills it. (Not runkit.checkpoint_state's
    layout: gcbc's checkpoints keep theirs.)"""
    return {
        "params": carry["train_state"]["params"],
        "opt_state": carry["train_state"]["opt_state"],
        "key": carry["key"],
        **({"env_state": carry["env_state"]} if "env_state" in carry else {}),
    }


def resumed_carry(carry: dict, saved: dict) -> dict:
    """The initial carry with a checkpoint's state (restore_state of `checkpoint_state`'s layout) in it."""
    restored = {k: saved[k] for k in ("key", "env_state") if k in saved}  # env_state: online only
    return {**carry, "train_state": {"params": saved["params"], "opt_state": saved["opt_state"]}, **restored}


# ---- Setup shared by a run and --dry-run; the dry run's report -----------------------------------


def build(args: Args, raw_env, dims: dict):
    """The policy, its optimizer, the device mesh, the training env (online; None offline) and the epoch's
    body (online: carry -> (carry, metrics); offline: (carry, dataset) -> (carry, metrics))."""
    import envs

    policy = build_networks(args, dims["action_size"], dims["state_dim"])
    optimizer = optax.adam(args.learning_rate)
    mesh = runkit.data_mesh()
    num_train_steps = train_steps_per_epoch(args)
    if args.mode == "offline":
        epoch_body = lambda c, d: offline_epoch(c, d, policy, optimizer, dims, args, num_train_steps)
        return policy, optimizer, mesh, None, epoch_body
    env = envs.wrap_for_training(raw_env, episode_length=args.episode_length, cached_reset=args.cached_reset)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    epoch_body = lambda c: online_epoch(c, env, policy, optimizer, dims, args, num_train_steps, batch_sharding)
    return policy, optimizer, mesh, env, epoch_body


def init_carry(args: Args, dims: dict, policy, optimizer, env, k_init, k_reset, key) -> dict:
    """The initial carry {"train_state", "key"} (+ "env_state", "buffer" online, with env the training env)."""
    params = {"actor": policy.init(k_init, jnp.zeros((1, dims["state_dim"] + len(dims["goal_indices"]))))}
    carry = {"train_state": {"params": params, "opt_state": optimizer.init(params["actor"])}, "key": key}
    if env is not None:
        carry["env_state"] = jax.jit(env.reset)(jax.random.split(k_reset, args.num_envs))
        carry["buffer"] = buffer_init(args.replay_size, args.num_envs, dims["state_dim"], dims["action_size"])
    return carry


def dry_run(args: Args, raw_env, dims: dict, dataset: Optional[dict]) -> dict:
    """--dry-run: the epoch a real run would compile (from shapes, same donation and shardings), its
    costs printed as one JSON line (runkit.dry_run_report). Nothing is initialised, stepped or written."""
    runkit.skip_compilation_cache()
    runkit.apply_matmul_precision(args)
    policy, optimizer, mesh, env, epoch_body = build(args, raw_env, dims)
    key, k_init, k_reset, _ = runkit.seed_keys(args.seed, 1)
    carry = jax.eval_shape(lambda *keys: init_carry(args, dims, policy, optimizer, env, *keys), k_init, k_reset, key)
    shardings = runkit.carry_shardings(carry, mesh, args.num_envs)
    if env is not None:
        inputs, buffer_bytes = (), runkit.tree_bytes(carry["buffer"])
    else:
        with jax.default_device(jax.devices("cpu")[0]):  # the dataset stays off the accelerator
            inputs = (runkit.as_shapes(device_dataset(dataset)),)
        buffer_bytes = runkit.tree_bytes(inputs)
    compile_start = time.time()
    compiled = compile_epoch(epoch_body, carry, shardings, mesh, *inputs)
    compile_seconds = time.time() - compile_start
    params = carry["train_state"]["params"]
    flops = args.batch_size * runkit.dense_flops(params["actor"]) * runkit.PARAM_GRAD  # BC: one trained pass
    sgd_steps = train_steps_per_epoch(args) * (args.sgd_steps_per_train_step if env is not None else 1)
    extra = {"sgd_steps_per_epoch": sgd_steps}
    return runkit.dry_run_report(args, SCRIPT, compiled, compile_seconds, params, flops, buffer_bytes, extra)


# ---- Main: set up, then one host iteration per epoch (train, evaluate, log, checkpoint) ----------

if __name__ == "__main__":
    args = resolve(runkit.parse_args(Args, SCRIPT))
    check_args(args)
    runkit.apply_matmul_precision(args)
    online = args.mode == "online"
    raw_env, eval_env, dims = make_envs(args)
    dataset, val_dataset = (None, None) if online else load_offline_dataset(args, dims)
    if args.dry_run:  # compile, print the costs, exit: no run folder
        dry_run(args, raw_env, dims, dataset)
        sys.exit(0)
    checkpoint = runkit.load_checkpoint(args.resume, SCRIPT) if args.resume else None
    run_path = runkit.open_run(args, SCRIPT)

    # ---- setup: data or environments, the policy, the optimizer, the initial state, the compiled epoch ----
    policy, optimizer, mesh, env, epoch_body = build(args, raw_env, dims)
    key, k_init, k_reset, k_eval_base = runkit.seed_keys(args.seed, 1)
    carry = init_carry(args, dims, policy, optimizer, env, k_init, k_reset, key)
    epoch_inputs = () if online else (device_dataset(dataset),)
    validate = make_validation(policy, dims, args, val_dataset)  # {} without a -val twin
    start_epoch, env_steps, wall_offset = 0, 0, 0.0
    if checkpoint is not None:  # a checkpoint that does not fit fails here, before any compile
        carry = resumed_carry(carry, runkit.restore_state(checkpoint_state(carry), checkpoint["state"], args.resume))
        start_epoch, env_steps, wall_offset = checkpoint["epoch"] + 1, checkpoint["env_steps"], checkpoint["wall_time"]
    shardings = runkit.carry_shardings(carry, mesh, args.num_envs)
    carry = jax.device_put(carry, shardings)
    compile_start = time.time()
    epoch_fn = compile_epoch(epoch_body, carry, shardings, mesh, *epoch_inputs)
    compile_seconds = time.time() - compile_start
    evaluate_policy = make_evaluator(eval_env, policy, args)
    start_time = time.time() - wall_offset
    if online:  # a resume refills the buffer too
        carry = run_prefill(carry, shardings, env, policy, dims, args)
        env_steps += runkit.prefill_unrolls(args) * args.unroll_length * args.num_envs if checkpoint is None else 0

    # ---- the loop: one jitted epoch (collect +) update, then evaluate, log, checkpoint ----
    train_steps = train_steps_per_epoch(args)  # offline: SGD steps, and env_steps counts them (as offline_crl.py)
    env_steps_per_epoch = train_steps * args.num_envs * args.unroll_length if online else train_steps
    sgd_steps_per_epoch = train_steps * (args.sgd_steps_per_train_step if online else 1)
    headline = "eval/success" if is_ogbench_run(args) else "eval/episode_success"
    bar_steps = train_steps if online else 1  # the online epoch moves the bar per training step
    log = runkit.RunLog(args, SCRIPT, run_path, start_epoch, args.num_epochs, bar_steps, start_time, compile_seconds)
    for epoch in log.epochs:
        epoch_start = time.time()
        carry, train_metrics = epoch_fn(carry, *epoch_inputs)
        train_metrics = runkit.seed_rows(train_metrics)[0]  # a dict of floats; waits for the epoch
        epoch_seconds = time.time() - epoch_start
        env_steps += env_steps_per_epoch
        log.check_finite(train_metrics, epoch)
        actor_params = carry["train_state"]["params"]["actor"]
        eval_metrics = runkit.seed_rows(evaluate_policy(actor_params, runkit.eval_key(k_eval_base, epoch)))[0]
        sgd_steps = (epoch + 1) * sgd_steps_per_epoch
        record = log.record(epoch, env_steps, epoch_seconds, env_steps_per_epoch, train_metrics, eval_metrics)
        record = {"epoch": epoch, "env_steps": env_steps, "sgd_steps": sgd_steps, **record}  # the lines' key order
        record.update(validate(actor_params, epoch))  # validation/* on the -val twin, if there is one
        log.log(record, env_steps if online else sgd_steps, headline)
        log.checkpoint(checkpoint_state(carry), epoch, env_steps, record["wall_time"])
    log.finish(env_steps)
