"""Deep contrastive RL (CRL) for goal reaching, trainable at any depth from 4 to 1024.

Reproduces "1000 Layer Networks for Self-Supervised RL" (Wang et al., NeurIPS 2025) on the `envs`
package, in one file:

    python crl_deep.py --env humanoid_u_maze --depth 1024

The critic is a pair of encoders phi(s, a), psi(g) trained with InfoNCE to tell which goal of a
batch was reached in the future of which state-action; the actor maximises the energy
f(s, a, g) = -||phi(s, a) - psi(g)||. All three networks share one residual tower (Dense -> LayerNorm
-> swish, 4 per block), built with `nn.scan` over stacked block parameters so compile time does not
grow with depth. One jitted `lax.scan` runs a whole training epoch (collect, insert, sample, update);
the host loop only evaluates, logs and checkpoints (host code: the `runkit` package). See docs/crl_deep.md.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import runkit


@dataclass(frozen=True)
class Args(runkit.RunFlags):
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
    """critic energy: -||phi-psi||, -||phi-psi||^2, phi.psi, phi.psi/sqrt(repr_dim), cosine, -MRN distance"""
    loss: Literal["fwd_infonce", "bwd_infonce", "sym_infonce", "binary_nce"] = "fwd_infonce"
    """contrastive critic loss"""
    layer_norm: bool = True
    """LayerNorm after every hidden Dense (the paper's scaling recipe; --no-layer-norm ablates it)"""
    activation: Literal["swish", "relu"] = "swish"
    """hidden activation (relu only as the paper's ablation)"""
    hyperspherical_norm: bool = False
    """after each update project hidden Dense kernels to unit norm along the input axis (SimbaV2)"""
    remat: bool = False
    """recompute each residual block in the backward pass (least memory, one extra forward pass)"""
    scan_unroll: int = 1
    """residual blocks unrolled per iteration of the scan over blocks (speed vs compile time)"""
    matmul_precision: Literal["default", "float32", "bfloat16"] = "default"
    """default: jax's own float32 matmuls (float32 on CPU, TensorFloat32 on NVIDIA Ampere/Hopper GPUs);
    float32: full float32 on every backend; bfloat16: the towers' Dense layers compute in bfloat16
    (params, LayerNorm, heads and losses stay float32; docs/gpu.md)"""
    cached_reset: bool = False
    """reproduce brax's AutoResetWrapper: one start and goal per env for the whole run"""
    num_seeds: int = 1
    """independent agents (seeds seed .. seed + num_seeds - 1) in one process and one compiled epoch"""
    save_buffer: bool = False
    """also write the replay buffer to <run>/buffer.npz at each checkpoint (OGBench keys)"""


SCRIPT = "crl_deep"


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


class Dims(NamedTuple):  # sizes taken from the env: obs = concat[state, goal = state[goal_indices]]
    state_dim: int
    goal_indices: tuple
    action_size: int


def build_networks(args: Args, obs_size: int, goal_size: int, action_size: int) -> Networks:
    """The three flax modules (flax infers the input sizes; obs_size and goal_size are not used)."""
    actor_depth = args.actor_depth or args.depth
    critic_depth = args.critic_depth or args.depth
    return Networks(
        actor=Actor(make_tower(args, actor_depth), action_size),
        sa_encoder=Encoder(make_tower(args, critic_depth), args.repr_dim),
        g_encoder=Encoder(make_tower(args, critic_depth), args.repr_dim),
    )


# ---- Energies and losses -------------------------------------------------------------------------

# --- shared block: energies (identical in every script; tests/test_copies.py) ---
SQRT_EPS = 1e-6  # inside every square root: finite gradients at zero distance and zero norm


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


# --- end shared block: energies ---


# ---- Train state and SGD step --------------------------------------------------------------------


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


def project_kernels(params):
    """Hyperspherical normalisation: each hidden Dense kernel column gets unit L2 norm over inputs. Heads
    (mean, log_std, head) are left free so the output scale can still be learned."""

    def project(path, x):
        names = [getattr(p, "key", "") for p in path]
        if names[-1] != "kernel" or any(n in ("mean", "log_std", "head") for n in names):
            return x
        return x / (jnp.linalg.norm(x, axis=-2, keepdims=True) + 1e-8)

    return jax.tree_util.tree_map_with_path(project, params)


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


# ---- Replay buffer: a ring of each env's trajectory, time-major [capacity, num_envs, ...] --------


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


# ---- Collection and the training epoch -----------------------------------------------------------


def collect_unroll(env_step, actor: Actor, actor_params, env_state, key, unroll_length: int, state_dim: int):
    """Steps the batched training env (`env_step`: its step function) with the stochastic policy. Returns
    the new env state and (state [T, E, state_dim], action [T, E, A], traj_id [T, E]) of the steps taken
    (each state is the one the action was taken in)."""

    def step(env_state, key):
        mean, log_std = actor.apply(actor_params, env_state.obs)
        action, _ = sample_action(mean, log_std, key)
        record = (env_state.obs[:, :state_dim], action, env_state.info["traj_id"].astype(jnp.int32))
        return env_step(env_state, action), record

    env_state, (states, actions, traj_ids) = jax.lax.scan(step, env_state, jax.random.split(key, unroll_length))
    return env_state, states, actions, traj_ids


def collect_and_insert(carry: dict, env_step, nets: Networks, args: Args, dims: Dims, key) -> dict:
    """One unroll of the current policy, written into the buffer."""
    actor_params = carry["train_state"]["params"]["actor"]
    env_state, states, actions, traj_ids = collect_unroll(
        env_step, nets.actor, actor_params, carry["env_state"], key, args.unroll_length, dims.state_dim
    )
    return {**carry, "env_state": env_state, "buffer": buffer_insert(carry["buffer"], states, actions, traj_ids)}


def prefill(carry: dict, env_step, nets: Networks, args: Args, dims: Dims, num_unrolls: int) -> dict:
    """Fills the buffer with `num_unrolls` unrolls of the initial policy (no updates)."""

    def one(carry, _):
        key, k_collect = jax.random.split(carry["key"])
        return {**collect_and_insert(carry, env_step, nets, args, dims, k_collect), "key": key}, None

    carry, _ = jax.lax.scan(one, carry, None, length=num_unrolls)
    return carry


def train_epoch(
    carry: dict,
    env_step,
    nets: Networks,
    optimizers: Optimizers,
    args: Args,
    dims: Dims,
    num_train_steps: int,
    batch_sharding=None,
):
    """`num_train_steps` x (collect an unroll, insert it, `sgd_steps_per_train_step` SGD steps).
    carry = {"train_state", "buffer", "env_state", "key"}; returns (carry, epoch-mean metrics)."""

    def sgd(carry_inner, key):
        train_state, buffer = carry_inner
        k_sample, k_sgd = jax.random.split(key)
        batch = buffer_sample(buffer, k_sample, args.batch_size, args.discount, dims.goal_indices)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        train_state, metrics = sgd_step(train_state, batch, k_sgd, nets, optimizers, args)
        return (train_state, buffer), metrics

    def train_step(carry, step):
        key, k_collect, k_sgd = jax.random.split(carry["key"], 3)
        carry = collect_and_insert(carry, env_step, nets, args, dims, k_collect)
        (train_state, buffer), metrics = jax.lax.scan(
            sgd, (carry["train_state"], carry["buffer"]), jax.random.split(k_sgd, args.sgd_steps_per_train_step)
        )
        runkit.progress(step)  # the progress bar moves per training step, from inside the jitted epoch
        new_carry = {"train_state": train_state, "buffer": buffer, "env_state": carry["env_state"], "key": key}
        return new_carry, jax.tree_util.tree_map(jnp.mean, metrics)

    carry, metrics = jax.lax.scan(train_step, carry, jnp.arange(num_train_steps))
    return carry, jax.tree_util.tree_map(jnp.mean, metrics)


def carry_builder(env, nets: Networks, optimizers: Optimizers, args: Args, dims: Dims):
    """(k_init, k_reset, key) -> the initial carry {"train_state", "buffer", "env_state", "key"}; with
    --num-seeds > 1 vmapped: stacked keys in, one carry per seed along a leading axis."""

    def make_carry(k_init, k_reset, key):
        return {
            "train_state": init_train_state(k_init, nets, optimizers, args, dims),
            "buffer": buffer_init(args.replay_size, args.num_envs, dims.state_dim, dims.action_size),
            "env_state": env.reset(jax.random.split(k_reset, args.num_envs)),
            "key": key,
        }

    return jax.vmap(make_carry) if args.num_seeds > 1 else make_carry


def compile_epoch(
    carry_shapes, shardings, mesh: Mesh, env_step, nets: Networks, optimizers: Optimizers, args: Args, dims
):
    """The whole epoch as one XLA program, compiled from shapes alone, its carry donated (updated in place).
    With --num-seeds > 1 one program for all seeds (vmapped over the seed axis), metrics [num_seeds]."""
    num_train_steps = runkit.train_steps_per_epoch(args)
    by_seed = args.num_seeds > 1  # metrics [num_seeds]; else the batch split over devices
    batch_sharding = None if by_seed else NamedSharding(mesh, PartitionSpec("data"))
    epoch = lambda c: train_epoch(c, env_step, nets, optimizers, args, dims, num_train_steps, batch_sharding)
    epoch = runkit.over_seeds(epoch, mesh, args.num_seeds)
    metrics_sharding = NamedSharding(mesh, PartitionSpec("data") if by_seed else PartitionSpec())
    jitted = jax.jit(epoch, in_shardings=(shardings,), out_shardings=(shardings, metrics_sharding), donate_argnums=0)
    return jitted.lower(carry_shapes).compile()


def run_prefill(carry: dict, shardings, env_step, nets: Networks, args: Args, dims: Dims, mesh: Mesh):
    """The replay buffer filled by `runkit.prefill_unrolls(args)` unrolls of the initial policy, in one jitted
    scan (of every seed with --num-seeds > 1)."""
    fill = runkit.over_seeds(
        lambda c: prefill(c, env_step, nets, args, dims, runkit.prefill_unrolls(args)), mesh, args.num_seeds
    )
    return jax.jit(fill, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)(carry)


def make_evaluator(nets: Networks, args: Args):
    """jit(actor params, key) -> the paper's metrics of the deterministic policy on the eval env (--eval-env,
    default the `_eval` variant of --env), over num_eval_envs episodes; vmapped over seeds with --num-seeds."""
    import envs

    eval_env = envs.make(args.eval_env or envs.eval_variant(args.env), **env_options(args))

    def evaluate_policy(actor_params, key):
        act = lambda obs: deterministic_action(nets.actor, actor_params, obs)
        return envs.evaluate(eval_env, act, key, args.num_eval_envs, args.episode_length)

    return jax.jit(jax.vmap(evaluate_policy) if args.num_seeds > 1 else evaluate_policy)


# ---- The run's schedule, input checks, what a checkpoint holds -----------------------------------


def env_options(args: Args) -> dict:
    return {"true_inertia_obs": True} if args.true_inertia_obs else {}


def check_args(args: Args, env_ids=None, num_devices: Optional[int] = None):
    """Every bad-input check that needs no env and no compilation; `runkit.fail`s on the first. env_ids
    defaults to envs.ENV_IDS, num_devices to jax.device_count() (tools/grid.py vets sweeps with it)."""
    runkit.check_online(args, env_ids, num_devices)
    fail = runkit.fail
    if args.true_inertia_obs and not all(e.startswith("humanoid") for e in (args.env, args.eval_env or args.env)):
        fail("--true-inertia-obs applies to humanoid envs only")
    if args.batch_size < 2:
        fail(f"--batch-size must be at least 2 for contrastive negatives (got {args.batch_size})")
    if args.energy == "mrn" and args.repr_dim % 2:
        fail(f"--energy mrn splits the representation in halves: --repr-dim must be even (got {args.repr_dim})")
    if args.min_replay_size < 2:
        fail("--min-replay-size must be at least 2 (a goal must lie in a stored future step)")


# ---- Setup shared by a run and --dry-run; the dry run's report -----------------------------------


def build(args: Args, k_init, k_reset, key):
    """The training env's step (jitted once: prefill and epoch share its trace), the sizes, networks and
    optimizers, the initial carry's builder, its shapes (nothing computed) and its shardings."""
    import envs

    raw_env = envs.make(args.env, **env_options(args))
    env = envs.wrap_for_training(raw_env, episode_length=args.episode_length, cached_reset=args.cached_reset)
    dims = Dims(raw_env.state_dim, tuple(int(i) for i in raw_env.goal_indices), raw_env.action_size)
    nets = build_networks(args, raw_env.observation_size, len(dims.goal_indices), dims.action_size)
    optimizers = make_optimizers(args)
    make_carry = carry_builder(env, nets, optimizers, args, dims)
    carry_shapes = jax.eval_shape(make_carry, k_init, k_reset, key)
    mesh = runkit.data_mesh()
    shardings = runkit.carry_shardings(carry_shapes, mesh, args.num_envs, args.num_seeds)
    return jax.jit(env.step), dims, nets, optimizers, mesh, make_carry, carry_shapes, shardings


def epoch_flops(params: dict, args: Args) -> int:
    """Dense FLOPs of an epoch's SGD steps (of every seed, for seed-stacked params)."""
    return sgd_step_flops(params, args) * runkit.train_steps_per_epoch(args) * args.sgd_steps_per_train_step


def sgd_step_flops(params: dict, args: Args) -> int:
    """Dense FLOPs of one SGD step (runkit.dry_run's rule): the critic loss trains phi(s, a) and psi(g); the
    actor loss trains the actor and passes the gradient through phi(s, a ~ pi) (psi(g) is reused)."""
    per_example = (
        runkit.dense_flops(params["actor"]) * runkit.PARAM_GRAD
        + runkit.dense_flops(params["sa_encoder"]) * (runkit.PARAM_GRAD + runkit.INPUT_GRAD)
        + runkit.dense_flops(params["g_encoder"]) * runkit.PARAM_GRAD
    )
    return args.batch_size * per_example


def dry_run(args: Args) -> dict:
    """--dry-run: the epoch a real run would compile (from shapes, same donation and shardings), its costs
    printed as one JSON line. Nothing is initialised, stepped or written."""
    runkit.skip_compilation_cache()
    key, k_init, k_reset, _ = runkit.seed_keys(args.seed, args.num_seeds)
    env_step, dims, nets, optimizers, mesh, _, carry_shapes, shardings = build(args, k_init, k_reset, key)
    stacked = carry_shapes["train_state"]["params"]  # with --num-seeds: report one seed's slice
    params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[args.num_seeds > 1 :], x.dtype), stacked)
    estimate = runkit.estimate_epoch(SCRIPT, epoch_flops(stacked, args), args.batch_size, args.width)
    compile_start = time.time()
    compiled = compile_epoch(carry_shapes, shardings, mesh, env_step, nets, optimizers, args, dims)
    compile_seconds = time.time() - compile_start
    sgd_steps = runkit.train_steps_per_epoch(args) * args.sgd_steps_per_train_step
    extra = {"sgd_steps_per_epoch": sgd_steps, "num_seeds": args.num_seeds, "epoch_seconds_estimate": estimate}
    flops, buffer_bytes = sgd_step_flops(params, args), runkit.tree_bytes(carry_shapes["buffer"])
    return runkit.dry_run_report(args, SCRIPT, compiled, compile_seconds, params, flops, buffer_bytes, extra)


# ---- Main: set up, then one host iteration per epoch (train, evaluate, log, checkpoint) ----------

if __name__ == "__main__":
    args = runkit.parse_args(Args, SCRIPT)
    runkit.init_distributed()
    check_args(args)
    runkit.apply_matmul_precision(args)
    if args.dry_run:  # compile, print the costs, exit: no run folder
        dry_run(args)
        sys.exit(0)
    checkpoint = runkit.load_checkpoint(args.resume, SCRIPT) if args.resume else None
    run_path = runkit.open_run(args, SCRIPT)
    runkit.log_backend(SCRIPT)

    # ---- setup: envs, networks, optimizers, the initial state and the compiled epoch ----
    key, k_init, k_reset, k_eval_base = runkit.seed_keys(args.seed, args.num_seeds)  # [num_seeds, 2] each
    env_step, dims, nets, optimizers, mesh, make_carry, carry_shapes, shardings = build(args, k_init, k_reset, key)
    if checkpoint is not None:  # a checkpoint that does not fit fails here, before any compile
        saved = runkit.restore_state(runkit.checkpoint_state(carry_shapes), checkpoint["state"], args.resume)
    runkit.estimate_epoch(SCRIPT, epoch_flops(carry_shapes["train_state"]["params"], args), args.batch_size, args.width)
    # the initial state is built (in place, split over devices) while the epoch compiles from shapes alone
    epoch_fn, compile_seconds, carry = runkit.compile_beside(
        lambda: compile_epoch(carry_shapes, shardings, mesh, env_step, nets, optimizers, args, dims),
        lambda: jax.jit(make_carry, out_shardings=shardings)(k_init, k_reset, key),
    )
    start_epoch, env_steps, wall_offset, buffer = 0, 0, 0.0, None
    if checkpoint is not None:  # with the buffer saved beside the checkpoint, if any
        buffer = runkit.saved_buffers(run_path, checkpoint["epoch"], args.replay_size, args.seed, args.num_seeds)
        carry = runkit.resumed_carry(saved, carry["buffer"] if buffer is None else buffer, shardings)
        start_epoch, env_steps, wall_offset = checkpoint["epoch"] + 1, checkpoint["env_steps"], checkpoint["wall_time"]
    evaluate_policy = make_evaluator(nets, args)
    start_time = time.time() - wall_offset
    if buffer is None:  # a fresh run, or a resume whose buffer was not saved: refill it
        carry = run_prefill(carry, shardings, env_step, nets, args, dims, mesh)
        env_steps += runkit.prefill_unrolls(args) * args.unroll_length * args.num_envs

    # ---- the loop: one jitted epoch (collect + update), then evaluate, log, checkpoint ----
    train_steps = runkit.train_steps_per_epoch(args)
    env_steps_per_epoch = train_steps * args.num_envs * args.unroll_length  # per seed
    log = runkit.RunLog(args, SCRIPT, run_path, start_epoch, args.num_epochs, train_steps, start_time, compile_seconds)
    for epoch in log.epochs:
        epoch_start = time.time()
        carry, train_metrics = epoch_fn(carry)
        train_metrics = runkit.seed_rows(train_metrics)  # a dict of floats per seed; waits for the epoch
        epoch_seconds = time.time() - epoch_start
        env_steps += env_steps_per_epoch
        log.check_finite(train_metrics, epoch)
        actor_params = carry["train_state"]["params"]["actor"]
        eval_metrics = runkit.seed_rows(evaluate_policy(actor_params, runkit.eval_key(k_eval_base, epoch)))
        records = [
            log.record(epoch, env_steps, epoch_seconds, env_steps_per_epoch, training, evaluation, seed)
            for seed, training, evaluation in zip(log.seeds, train_metrics, eval_metrics)
        ]
        log.log(records, env_steps, "eval/episode_success")
        if args.save_buffer:  # first, so a checkpoint never names a buffer that is not there yet
            runkit.save_buffers(run_path, carry["buffer"], epoch, args.seed, args.num_seeds)
        log.checkpoint(runkit.checkpoint_state(carry), epoch, env_steps, records[0]["wall_time"])
    log.finish(env_steps)
