"""SAC with hindsight experience replay (HER) on the goal-conditioned benchmark, with deep residual nets.

The paper's SAC / SAC+HER baselines (Fig. 12), with the depth-scalable residual tower of crl_deep.py
(Fig. 13). Sparse reward: 1 when the achieved goal of the state a step ends in lies within the env's
success radius of the goal. HER relabels a share of the sampled goals with the achieved goal of a later
step of the same episode (never across a reset); `--her-ratio 0` is plain SAC. One jitted `lax.scan`
runs a whole epoch (collect, insert, sample, update); the host loop only evaluates, logs, checkpoints
(host code: the `runkit` package; what td3_her.py shares: the `her` block).

    python sac_her.py --env ant_u4_maze --depth 4
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import runkit


@dataclass(frozen=True)
class Args(runkit.RunFlags):
    # --- shared block: her_args (identical in every script; tests/test_copies.py) ---
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
    replay_size: int = 10_000
    """replay capacity in steps PER ENV (a ring buffer of each env's trajectory)"""
    min_replay_size: int = 1_000
    """steps per env collected with uniform random actions before training starts"""
    her_strategy: Literal["future", "final"] = "future"
    """hindsight goal: a uniform later step of the episode, or its last stored step"""
    her_ratio: float = 0.8
    """share of sampled transitions whose goal is relabelled (0: no relabelling)"""
    cached_reset: bool = False
    """reproduce brax's AutoResetWrapper: one start and goal per env for the whole run"""
    # --- end shared block: her_args ---
    sgd_steps_per_train_step: int = 800
    """SGD steps (critic, actor, temperature, targets) after each collected unroll"""
    discount: float = 0.9
    """discount of the TD target (the benchmark's SAC default)"""
    learning_rate: float = 1e-4
    """Adam learning rate of actor, critics and temperature"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    target_entropy: Optional[float] = None
    """entropy the temperature steers the policy towards; default -0.5 * action size (the paper's code)"""


SCRIPT = "sac_her"


# ---- Networks ------------------------------------------------------------------------------------

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


# --- shared block: her (identical in every script; tests/test_copies.py) ---
# What SAC+HER and TD3+HER share: the twin critic, the TD helpers, the HER replay buffer and its sampler,
# collection, and the setup of a run and of --dry-run. The setup calls the algorithm's own parts, defined
# after this block: build_networks, init_train_state, train_epoch, deterministic_action, sgd_step_flops.

# ---- The twin critic: two Q(state, goal, action) towers in one vmapped call ----------------------


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


# ---- TD helpers ----------------------------------------------------------------------------------


def td_target(reward, bootstrap, next_value, discount):
    """r + discount * V(s'), with V(s') dropped where the episode terminated (bootstrap = 0)."""
    return reward + discount * bootstrap * next_value


def soft_update(target_params, online_params, tau):
    """Polyak averaging: target <- (1 - tau) * target + tau * online."""
    return jax.tree_util.tree_map(lambda t, o: (1.0 - tau) * t + tau * o, target_params, online_params)


def masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ---- The HER replay buffer: a ring of per-env trajectories, sampled inside one episode -----------


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


# ---- Collection ----------------------------------------------------------------------------------


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


# ---- Setup shared by a run and --dry-run ---------------------------------------------------------


def check_args(args: Args, env_ids=None, num_devices: Optional[int] = None):
    """Every bad-input check that needs no env and no compilation; `runkit.fail`s on the first. env_ids
    defaults to envs.ENV_IDS, num_devices to jax.device_count() (tools/grid.py passes args only)."""
    runkit.check_online(args, env_ids, num_devices)


def build(args: Args, k_init, k_reset, key):
    """The training env, its sizes, the networks and optimizer, the initial carry's builder (k_init, k_reset,
    key) -> {"train_state", "buffer", "env_state", "key"}, its shapes (nothing computed), mesh and shardings."""
    import envs

    raw_env = envs.make(args.env)
    env = envs.wrap_for_training(raw_env, episode_length=args.episode_length, cached_reset=args.cached_reset)
    obs_size, action_size, goal_indices = raw_env.observation_size, raw_env.action_size, raw_env.goal_indices
    dims = {
        "state_dim": raw_env.state_dim,
        "goal_indices": tuple(int(i) for i in goal_indices),
        "action_size": action_size,
        "goal_reach_thresh": float(raw_env.goal_reach_thresh),
    }
    nets = build_networks(args, action_size)
    optimizer = optax.adam(args.learning_rate)

    def make_carry(k_init, k_reset, key):
        return {
            "train_state": init_train_state(k_init, nets, optimizer, obs_size, action_size),
            "buffer": buffer_init(args.replay_size, args.num_envs, obs_size, action_size, len(dims["goal_indices"])),
            "env_state": env.reset(jax.random.split(k_reset, args.num_envs)),
            "key": key,
        }

    carry_shapes = jax.eval_shape(make_carry, k_init, k_reset, key)
    mesh = runkit.data_mesh()
    shardings = runkit.carry_shardings(carry_shapes, mesh, args.num_envs)
    return env, dims, nets, optimizer, mesh, make_carry, carry_shapes, shardings


def compile_epoch(carry_shapes, shardings, mesh, env, nets, optimizer, dims: dict, args: Args):
    """The whole epoch as one XLA program, compiled from shapes alone, its carry donated (updated in place)."""
    num_train_steps = runkit.train_steps_per_epoch(args)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    epoch = lambda c: train_epoch(c, env, nets, optimizer, dims, args, num_train_steps, batch_sharding)
    out_shardings = (shardings, NamedSharding(mesh, PartitionSpec()))
    jitted = jax.jit(epoch, in_shardings=(shardings,), out_shardings=out_shardings, donate_argnums=0)
    return jitted.lower(carry_shapes).compile()


def make_evaluator(nets, args: Args):
    """jit(actor params, key) -> the paper's metrics of the deterministic policy on the eval env (--eval-env,
    default the `_eval` variant of --env), over num_eval_envs episodes."""
    import envs

    eval_env = envs.make(args.eval_env or envs.eval_variant(args.env))

    def evaluate_policy(actor_params, key):
        act = lambda obs: deterministic_action(nets[0], actor_params, obs)
        return envs.evaluate(eval_env, act, key, args.num_eval_envs, args.episode_length)

    return jax.jit(evaluate_policy)


def start(args: Args, checkpoint, run_path: str, k_init, k_reset, key):
    """The run from its first epoch (or the checkpoint's next): (epoch_fn, evaluate_policy, carry, env_steps,
    log). A checkpoint that does not fit fails before any compile; the epoch compiles while the initial state
    is built; the buffer is then filled by uniform random actions (a resume refills it: it is not saved)."""
    env, dims, nets, optimizer, mesh, make_carry, carry_shapes, shardings = build(args, k_init, k_reset, key)
    if checkpoint is not None:
        saved = runkit.restore_state(runkit.checkpoint_state(carry_shapes), checkpoint["state"], args.resume)
    epoch_fn, compile_seconds, carry = runkit.compile_beside(
        lambda: compile_epoch(carry_shapes, shardings, mesh, env, nets, optimizer, dims, args),
        lambda: jax.jit(make_carry, out_shardings=shardings)(k_init, k_reset, key),
    )
    start_epoch, env_steps, wall_offset = 0, runkit.prefill_unrolls(args) * args.unroll_length * args.num_envs, 0.0
    if checkpoint is not None:  # the refilled buffer's steps are not counted again
        carry = runkit.resumed_carry(saved, carry["buffer"], shardings)
        start_epoch, env_steps, wall_offset = checkpoint["epoch"] + 1, checkpoint["env_steps"], checkpoint["wall_time"]
    evaluate_policy = make_evaluator(nets, args)
    start_time = time.time() - wall_offset
    fill = lambda c: prefill(c, env, dims, args, runkit.prefill_unrolls(args))
    carry = jax.jit(fill, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)(carry)
    steps = runkit.train_steps_per_epoch(args)
    log = runkit.RunLog(args, SCRIPT, run_path, start_epoch, args.num_epochs, steps, start_time, compile_seconds)
    return epoch_fn, evaluate_policy, carry, env_steps, log


def dry_run(args: Args) -> dict:
    """--dry-run: the epoch a real run would compile (from shapes, same donation and shardings), its costs
    printed as one JSON line. Nothing is initialised, stepped or written."""
    runkit.skip_compilation_cache()
    runkit.apply_matmul_precision(args)
    key, k_init, k_reset, _ = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    env, dims, nets, optimizer, mesh, _, carry_shapes, shardings = build(args, k_init, k_reset, key)
    compile_start = time.time()
    compiled = compile_epoch(carry_shapes, shardings, mesh, env, nets, optimizer, dims, args)
    compile_seconds = time.time() - compile_start
    params, buffer_bytes = carry_shapes["train_state"]["params"], runkit.tree_bytes(carry_shapes["buffer"])
    extra = {"sgd_steps_per_epoch": runkit.train_steps_per_epoch(args) * args.sgd_steps_per_train_step}
    flops = sgd_step_flops(params, args)
    return runkit.dry_run_report(args, SCRIPT, compiled, compile_seconds, params, flops, buffer_bytes, extra)


# --- end shared block: her ---


# ---- Losses and one SGD step (critics, then actor, then temperature, then the target critics) ----


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


# ---- Collection and the training epoch; the dry run's FLOPs --------------------------------------


def explore_policy(nets, actor_params):
    """The training behaviour: a sample from the squashed Gaussian."""
    return lambda obs, key: sample_action(*nets[0].apply(actor_params, obs), key)[0]


def train_epoch(carry: dict, env, nets, optimizer, dims: dict, args: Args, num_train_steps: int, batch_sharding=None):
    """`num_train_steps` x (collect an unroll, insert it, `sgd_steps_per_train_step` SGD steps).
    carry = {"train_state", "buffer", "env_state", "key"}; returns (carry, epoch-mean metrics)."""
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

    def train_step(carry, step):
        key, k_collect, k_sgd = jax.random.split(carry["key"], 3)
        policy = explore_policy(nets, carry["train_state"]["params"]["actor"])
        env_state, records = collect_unroll(
            env, policy, carry["env_state"], k_collect, args.unroll_length, dims["goal_indices"]
        )
        buffer = buffer_insert(carry["buffer"], records)
        (train_state, buffer), metrics = jax.lax.scan(
            sgd, (carry["train_state"], buffer), jax.random.split(k_sgd, args.sgd_steps_per_train_step)
        )
        runkit.progress(step)  # the progress bar moves per training step, from inside the jitted epoch
        new_carry = {"train_state": train_state, "buffer": buffer, "env_state": env_state, "key": key}
        return new_carry, jax.tree_util.tree_map(jnp.mean, metrics)

    carry, metrics = jax.lax.scan(train_step, carry, jnp.arange(num_train_steps))
    return carry, jax.tree_util.tree_map(jnp.mean, metrics)


def sgd_step_flops(params: dict, args: Args) -> int:
    """Dense FLOPs of one SGD step (runkit.dry_run's rule). Critic loss: the actor on s' (forward), the target
    critics on s' (forward), the critics on s (trained); actor loss: the actor on s (trained), the critics on
    (s, a ~ pi) (gradient to the action only)."""
    actor_flops, critic_flops = runkit.dense_flops(params["actor"]), runkit.dense_flops(params["critic"])
    actor_passes = runkit.FORWARD + runkit.PARAM_GRAD
    critic_passes = runkit.FORWARD + runkit.PARAM_GRAD + runkit.INPUT_GRAD
    return args.batch_size * (actor_flops * actor_passes + critic_flops * critic_passes)


# ---- Main: set up, then one host iteration per epoch (train, evaluate, log, checkpoint) ----------

if __name__ == "__main__":
    args = runkit.parse_args(Args, SCRIPT)
    check_args(args)
    runkit.apply_matmul_precision(args)
    if args.dry_run:  # compile, print the costs, exit: no run folder
        dry_run(args)
        sys.exit(0)
    checkpoint = runkit.load_checkpoint(args.resume, SCRIPT) if args.resume else None
    run_path = runkit.open_run(args, SCRIPT)
    runkit.log_backend(SCRIPT)

    # ---- setup: env, networks, optimizer, the initial (or resumed) state, the compiled epoch, the prefill ----
    key, k_init, k_reset, k_eval_base = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    epoch_fn, evaluate_policy, carry, env_steps, log = start(args, checkpoint, run_path, k_init, k_reset, key)
    env_steps_per_epoch = runkit.train_steps_per_epoch(args) * args.num_envs * args.unroll_length

    # ---- the loop: one jitted epoch (collect + update), then evaluate, log, checkpoint ----
    for epoch in log.epochs:
        epoch_start = time.time()
        carry, train_metrics = epoch_fn(carry)
        train_metrics = runkit.seed_rows(train_metrics)[0]  # host floats; waits for the epoch
        epoch_seconds = time.time() - epoch_start
        env_steps += env_steps_per_epoch
        log.check_finite(train_metrics, epoch)
        actor_params = carry["train_state"]["params"]["actor"]
        eval_metrics = runkit.seed_rows(evaluate_policy(actor_params, jax.random.fold_in(k_eval_base, epoch)))[0]
        record = log.record(epoch, env_steps, epoch_seconds, env_steps_per_epoch, train_metrics, eval_metrics)
        log.log(record, env_steps, "eval/episode_success")
        log.checkpoint(runkit.checkpoint_state(carry), epoch, env_steps, record["wall_time"])
    log.finish(env_steps)
