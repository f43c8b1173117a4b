"""Offline contrastive RL (CRL) on OGBench-format datasets, with the paper's residual towers (Sec. 4.6, A.8).

    python offline_crl.py --dataset data/pointmaze-medium-navigate-v0.npz --env pointmaze-medium-navigate-v0
    python offline_crl.py --dataset runs/<online run>/buffer.npz --env reacher     # our own envs/ tasks

The dataset is an OGBench `.npz` (`observations`, `actions`, `terminals`: 1 on the last row of each
trajectory; a `-val.npz` twin beside it is used for validation losses). The critic phi(s, a), psi(g)
is trained with a contrastive loss on (s, a, future goal of the same trajectory); the actor with
DDPG+BC: `-Q / stop_grad(mean |Q|) - alpha * log pi(a_data | s, g)`. Evaluation runs the deterministic
actor on the 5 OGBench tasks of `--env` (a host loop over the gymnasium env, the policy jitted), or
with `envs.evaluate` when `--env` is one of our `envs/` ids.
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


@dataclasses.dataclass
class Args:
    dataset: str = ""
    """OGBench-format .npz (observations, actions, terminals); a `<name>-val.npz` twin is used when present"""
    env: str = ""
    """evaluation env: an OGBench env/dataset name (e.g. antmaze-medium-navigate-v0) or one of our envs/ ids"""
    train_steps: int = 1_000_000
    """gradient steps in total"""
    eval_every: int = 100_000
    """gradient steps between evaluations (one epoch: log, evaluate, checkpoint)"""
    eval_episodes: int = 50
    """OGBench: episodes per task (5 tasks); envs/ ids: number of evaluation envs (one episode each)"""
    eval_episode_length: Optional[int] = None
    """cap on evaluation episode length (default: the env's own limit, 1000 for OGBench mazes)"""
    depth: int = 4
    """Dense layers inside the residual blocks of every network (a positive multiple of 4)"""
    critic_depth: Optional[int] = None
    """depth of the critic encoders phi and psi (default: --depth)"""
    actor_depth: Optional[int] = None
    """depth of the actor (default: --depth)"""
    width: int = 512
    """width of every hidden layer (OGBench default 512)"""
    repr_dim: int = 512
    """size of the representations phi(s, a) and psi(g)"""
    batch_size: int = 1024
    """transitions per gradient step; the other rows' goals are the negatives"""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor"""
    critic_lr: float = 3e-4
    """Adam learning rate of phi and psi"""
    discount: Optional[float] = None
    """value goals are s_{t+k} with P(k) ~ discount^k (default 0.99; 0.995 for giant and humanoid mazes)"""
    alpha: Optional[float] = None
    """behaviour-cloning weight of the actor loss (default: 0.1 antmaze and our envs, 0.03 pointmaze, 0.003 explore)"""
    energy: Literal["l2", "l2_squared", "dot", "scaled_dot", "cosine"] = "scaled_dot"
    """critic logit f(s,a,g): -||phi-psi||, -||phi-psi||^2, phi.psi, phi.psi/sqrt(repr_dim) (OGBench), cosine"""
    loss: Literal["binary_nce", "fwd_infonce", "bwd_infonce", "sym_infonce"] = "binary_nce"
    """critic loss: sigmoid cross-entropy against the identity (OGBench) or InfoNCE over rows/columns/both"""
    logsumexp_coef: float = 0.1
    """weight of mean(logsumexp^2) added to the InfoNCE losses (unused by binary_nce)"""
    cold_init: bool = False
    """initialise the final layer of phi and psi 100x smaller (the paper's cold-init ablation)"""
    seed: int = 0
    """seed of initialisation, sampling and evaluation"""
    track: bool = False
    """log to wandb (WANDB_MODE=offline works without network)"""
    wandb_project: str = "crl_deep"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user)"""
    run_dir: str = "runs"
    """folder that holds the run folders"""
    run_name: Optional[str] = None
    """run folder name (default: {env}__offline_crl__d{depth}__s{seed}__{unix time})"""
    resume: Optional[str] = None
    """checkpoint.pkl (or its run folder) of an interrupted run to continue, with that run's arguments"""


SCRIPT = "offline_crl"
COLD_INIT_SCALE = 1e-4  # variance factor of the cold-init head: weights 100x smaller
L2_EPS = 1e-6  # inside the sqrt of the L2 energy: finite gradient where phi == psi


def is_our_env(name: str) -> bool:
    import envs
    return name in envs.ENV_IDS


def default_alpha(env_name: str) -> float:
    """OGBench's per-dataset BC weights for CRL (spec section 7)."""
    if "explore" in env_name:
        return 0.003
    if env_name.startswith("pointmaze"):
        return 0.03
    return 0.1


def default_discount(env_name: str) -> float:
    return 0.995 if ("giant" in env_name or env_name.startswith("humanoidmaze")) else 0.99


def check_args(args: Args) -> None:
    """Rejects bad input before anything is compiled (one line on stderr, exit code 1)."""
    problems = []
    if args.resume is None:
        if not args.dataset:
            problems.append("--dataset PATH.npz is required")
        elif not os.path.isfile(args.dataset):
            problems.append(f"--dataset {args.dataset!r} does not exist")
        if not args.env:
            problems.append("--env is required (an OGBench env name or one of our envs/ ids)")
    elif not os.path.exists(args.resume):
        problems.append(f"--resume path {args.resume!r} does not exist")
    for name in ("depth", "critic_depth", "actor_depth"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 4):
            problems.append(f"--{name.replace('_', '-')} must be a positive multiple of 4, got {value}")
    for name in ("train_steps", "eval_every", "eval_episodes", "width", "repr_dim", "batch_size"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.batch_size < 2:
        problems.append("--batch-size must be at least 2 (the other rows are the negatives)")
    if args.eval_every > 0 and args.train_steps % args.eval_every:
        problems.append(f"--train-steps ({args.train_steps}) must be a multiple of --eval-every ({args.eval_every})")
    if args.discount is not None and not 0.0 < args.discount < 1.0:
        problems.append(f"--discount must be in (0, 1), got {args.discount}")
    if args.alpha is not None and args.alpha < 0:
        problems.append(f"--alpha must be >= 0, got {args.alpha}")
    if args.eval_episode_length is not None and args.eval_episode_length <= 0:
        problems.append(f"--eval-episode-length must be positive, got {args.eval_episode_length}")
    if problems:
        raise SystemExit("error: " + problems[0])


# ----------------------------------------------------------------------------------------------------
# Dataset: OGBench npz -> trajectory index; (s, a, s', geometric goal, uniform goal) sampled in jit
# ----------------------------------------------------------------------------------------------------
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
        raise ValueError(f"{path}: expected observations [N, D], actions [N, A], terminals [N]; got shapes "
                         f"{obs.shape}, {actions.shape}, {terminals.shape}")
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
    return {"observations": obs[:n].astype(np.float32), "actions": actions[:n].astype(np.float32),
            "terminals": terminals[:n].astype(np.float32)}


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
    return {"observations": jnp.asarray(dataset["observations"]), "actions": jnp.asarray(dataset["actions"]),
            "goals": jnp.asarray(dataset["observations"][:, goal_indices]),
            "transition_rows": jnp.asarray(transition_rows), "traj_end": jnp.asarray(traj_end)}


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


def sample_batch(data: dict, key, batch_size: int, discount: float) -> dict:
    t, t_next, value_goal, actor_goal = sample_indices(data, key, batch_size, discount)
    return {"observations": data["observations"][t], "actions": data["actions"][t],
            "next_observations": data["observations"][t_next],
            "value_goals": data["goals"][value_goal], "actor_goals": data["goals"][actor_goal]}


# ----------------------------------------------------------------------------------------------------
# Networks: the paper's residual tower (lecun-uniform Dense, LayerNorm, swish; blocks of 4 with a skip)
# ----------------------------------------------------------------------------------------------------
LECUN_UNIFORM = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class ResidualBlock(nn.Module):
    """4 x [Dense -> LayerNorm -> swish], then add the block input. Signature fits nn.scan."""

    width: int

    @nn.compact
    def __call__(self, x, _):
        skip = x
        for _layer in range(4):
            x = nn.swish(nn.LayerNorm()(nn.Dense(self.width, kernel_init=LECUN_UNIFORM)(x)))
        return x + skip, None


class ResidualTower(nn.Module):
    """Dense(width) -> LN -> swish, depth/4 residual blocks (nn.scan over stacked params: compile
    time does not grow with depth), then a linear head."""

    width: int
    depth: int
    out_dim: int
    head_init_scale: float = 1 / 3

    @nn.compact
    def __call__(self, x):
        x = nn.swish(nn.LayerNorm()(nn.Dense(self.width, kernel_init=LECUN_UNIFORM)(x)))
        blocks = nn.scan(ResidualBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=self.depth // 4)
        x, _ = blocks(self.width, name="blocks")(x, None)
        head_init = nn.initializers.variance_scaling(self.head_init_scale, "fan_in", "uniform")
        return nn.Dense(self.out_dim, kernel_init=head_init, name="head")(x)


def make_networks(args: Args, action_dim: int):
    """(sa_encoder phi(concat[s, a]), g_encoder psi(g), actor mean(concat[s, g]))."""
    critic_depth = args.critic_depth or args.depth
    head_scale = COLD_INIT_SCALE / 3 if args.cold_init else 1 / 3
    sa_encoder = ResidualTower(args.width, critic_depth, args.repr_dim, head_scale)
    g_encoder = ResidualTower(args.width, critic_depth, args.repr_dim, head_scale)
    actor = ResidualTower(args.width, args.actor_depth or args.depth, action_dim)
    return sa_encoder, g_encoder, actor


# ----------------------------------------------------------------------------------------------------
# Energies and losses
# ----------------------------------------------------------------------------------------------------
def energy_matrix(phi, psi, energy: str):
    """L[i, j] = f(phi_i, psi_j) for every pair of rows; [B, B] memory (no [B, B, latent] tensor)."""
    if energy in ("l2", "l2_squared"):
        sq = jnp.sum(phi**2, -1)[:, None] + jnp.sum(psi**2, -1)[None, :] - 2 * phi @ psi.T
        sq = jnp.maximum(sq, 0.0)
        return -sq if energy == "l2_squared" else -jnp.sqrt(sq + L2_EPS)
    if energy == "dot":
        return phi @ psi.T
    if energy == "scaled_dot":
        return phi @ psi.T / jnp.sqrt(phi.shape[-1])
    if energy == "cosine":
        unit = lambda z: z / jnp.sqrt(jnp.sum(z**2, -1, keepdims=True) + 1e-12)  # per row
        return unit(phi) @ unit(psi).T
    raise ValueError(f"unknown energy {energy!r}")


def energy_pairs(phi, psi, energy: str):
    """f(phi_i, psi_i) for matching rows only: [B]."""
    if energy in ("l2", "l2_squared"):
        sq = jnp.sum((phi - psi) ** 2, -1)
        return -sq if energy == "l2_squared" else -jnp.sqrt(sq + L2_EPS)
    if energy == "dot":
        return jnp.sum(phi * psi, -1)
    if energy == "scaled_dot":
        return jnp.sum(phi * psi, -1) / jnp.sqrt(phi.shape[-1])
    if energy == "cosine":
        unit = lambda z: z / jnp.sqrt(jnp.sum(z**2, -1, keepdims=True) + 1e-12)
        return jnp.sum(unit(phi) * unit(psi), -1)
    raise ValueError(f"unknown energy {energy!r}")


def contrastive_loss(logits, loss: str, logsumexp_coef: float):
    """Critic loss on the [B, B] logit matrix whose diagonal holds the positive pairs."""
    diag = jnp.diagonal(logits)
    if loss == "binary_nce":
        labels = jnp.eye(logits.shape[0])
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
    lse_rows = jax.nn.logsumexp(logits, axis=1)  # over goals, per (s, a): forward
    lse_cols = jax.nn.logsumexp(logits, axis=0)  # over (s, a), per goal: backward
    forward = -jnp.mean(diag - lse_rows) + logsumexp_coef * jnp.mean(lse_rows**2)
    backward = -jnp.mean(diag - lse_cols) + logsumexp_coef * jnp.mean(lse_cols**2)
    if loss == "fwd_infonce":
        return forward
    if loss == "bwd_infonce":
        return backward
    if loss == "sym_infonce":
        return 0.5 * (forward + backward)
    raise ValueError(f"unknown loss {loss!r}")


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


def make_losses(args: Args, sa_encoder, g_encoder, actor, alpha: float):
    def critic_loss_fn(critic_params, batch):
        sa = jnp.concatenate([batch["observations"], batch["actions"]], -1)
        phi = sa_encoder.apply(critic_params["sa_encoder"], sa)
        psi = g_encoder.apply(critic_params["g_encoder"], batch["value_goals"])
        logits = energy_matrix(phi, psi, args.energy)
        loss = contrastive_loss(logits, args.loss, args.logsumexp_coef)
        eye = jnp.eye(logits.shape[0])
        metrics = {"critic_loss": loss,
                   "categorical_accuracy": jnp.mean(jnp.argmax(logits, 1) == jnp.arange(logits.shape[0])),
                   "logits_pos": jnp.sum(logits * eye) / jnp.sum(eye),
                   "logits_neg": jnp.sum(logits * (1 - eye)) / jnp.sum(1 - eye)}
        return loss, metrics

    def actor_loss_fn(actor_params, critic_params, batch):
        obs, goals = batch["observations"], batch["actor_goals"]
        mean = actor.apply(actor_params, jnp.concatenate([obs, goals], -1))
        q_actions = jnp.clip(mean, -1.0, 1.0)
        phi = sa_encoder.apply(critic_params["sa_encoder"], jnp.concatenate([obs, q_actions], -1))
        psi = g_encoder.apply(critic_params["g_encoder"], goals)
        q = energy_pairs(phi, psi, args.energy)
        loss, (q_loss, bc_loss) = ddpg_bc_loss(q, mean, batch["actions"], alpha)
        return loss, {"actor_loss": loss, "q_loss": q_loss, "bc_loss": bc_loss, "q_mean": jnp.mean(q),
                      "bc_mse": jnp.mean((mean - batch["actions"]) ** 2)}

    return critic_loss_fn, actor_loss_fn


def init_train_state(key, sa_encoder, g_encoder, actor, obs_dim, action_dim, goal_dim, actor_optimizer,
                     critic_optimizer):
    k_sa, k_g, k_actor = jax.random.split(key, 3)
    critic = {"sa_encoder": sa_encoder.init(k_sa, jnp.zeros((1, obs_dim + action_dim))),
              "g_encoder": g_encoder.init(k_g, jnp.zeros((1, goal_dim)))}
    actor_params = actor.init(k_actor, jnp.zeros((1, obs_dim + goal_dim)))
    return {"critic": critic, "actor": actor_params, "critic_opt": critic_optimizer.init(critic),
            "actor_opt": actor_optimizer.init(actor_params)}


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------------------------------
# Evaluation: OGBench envs in a host loop (batched episodes, jitted policy); envs/ ids with envs.evaluate
# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
def versions() -> dict:
    import brax
    import flax
    import jaxlib
    import mujoco
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "brax": brax.__version__, "mujoco": mujoco.__version__,
            "python": sys.version.split()[0]}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def to_numpy(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def load_checkpoint(path: str) -> dict:
    """Reads checkpoint.pkl (or the one inside a run folder) into a dict of numpy arrays / scalars."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pkl")
    with open(path, "rb") as f:
        return pickle.load(f)


def save_checkpoint(path, args, train_state, key, epoch, train_steps, wall_time) -> None:
    ts = to_numpy(train_state)
    write_atomic(path, pickle.dumps({
        "script": SCRIPT, "args": dataclasses.asdict(args), "epoch": epoch, "env_steps": train_steps,
        "train_steps": train_steps, "wall_time": wall_time,
        "params": {"actor": ts["actor"], "sa_encoder": ts["critic"]["sa_encoder"],
                   "g_encoder": ts["critic"]["g_encoder"]},
        "opt_state_leaves": {k: jax.tree_util.tree_leaves(ts[k]) for k in ("critic_opt", "actor_opt")},
        "key": np.asarray(key)}))


def restore_train_state(checkpoint: dict, template: dict) -> dict:
    """The train state of a checkpoint, with a freshly initialised one giving the tree shapes."""
    params = checkpoint["params"]
    ts = {"actor": params["actor"], "critic": {"sa_encoder": params["sa_encoder"], "g_encoder": params["g_encoder"]}}
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
            raise SystemExit(f"error: --resume {args.resume!r} is not an {SCRIPT} checkpoint")
        run_path = os.path.dirname(os.path.abspath(
            os.path.join(args.resume, "checkpoint.pkl") if os.path.isdir(args.resume) else args.resume))
        args = Args(**{**checkpoint["args"], "resume": args.resume})
        check_args(args)

    # --- data and evaluation env: everything that can be wrong is checked before any compilation ---
    try:
        dataset = load_dataset(args.dataset)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    val_path = args.dataset[: -len(".npz")] + "-val.npz" if args.dataset.endswith(".npz") else None
    val_dataset = None
    if val_path and os.path.isfile(val_path):
        try:
            val_dataset = load_dataset(val_path)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    obs_dim, action_dim = dataset["observations"].shape[1], dataset["actions"].shape[1]
    ours = is_our_env(args.env)
    if ours:
        import envs
        eval_env = envs.make(envs.eval_variant(args.env))
        if obs_dim != eval_env.state_dim or action_dim != eval_env.action_size:
            raise SystemExit(f"error: dataset has observations of size {obs_dim} and actions of size {action_dim}; "
                             f"env {args.env!r} has state_dim {eval_env.state_dim}, action_size {eval_env.action_size}")
        goal_indices = np.asarray(eval_env.goal_indices)
    else:
        try:
            probe_env = make_ogbench_env(args.env, args.eval_episode_length)
        except Exception as e:  # gymnasium raises several types for unknown names
            raise SystemExit(f"error: --env {args.env!r} is neither one of our envs/ ids nor an OGBench env ({e})")
        env_obs, env_act = probe_env.observation_space.shape, probe_env.action_space.shape
        if env_obs != (obs_dim,) or env_act != (action_dim,):
            raise SystemExit(f"error: dataset has observations of size {obs_dim} and actions of size {action_dim}; "
                             f"OGBench env {args.env!r} has {env_obs[0]} and {env_act[0]}")
        goal_indices = np.arange(obs_dim)  # OGBench goals are full observations
    if val_dataset is not None and (val_dataset["observations"].shape[1] != obs_dim
                                    or val_dataset["actions"].shape[1] != action_dim):
        raise SystemExit(f"error: {val_path}: observation/action sizes differ from {args.dataset}")
    alpha = default_alpha(args.env) if args.alpha is None else args.alpha
    discount = default_discount(args.env) if args.discount is None else args.discount

    if checkpoint is None:
        run_name = args.run_name or f"{args.env}__{SCRIPT}__d{args.depth}__s{args.seed}__{int(time.time())}"
        run_path = os.path.join(args.run_dir, run_name)
        if os.path.exists(os.path.join(run_path, "checkpoint.pkl")):
            raise SystemExit(f"error: run folder {run_path!r} already holds a checkpoint; "
                             "use --resume or another --run-name")
        os.makedirs(run_path, exist_ok=True)
        write_atomic(os.path.join(run_path, "config.json"), json.dumps(
            {"script": SCRIPT, "args": dataclasses.asdict(args), "resolved": {"alpha": alpha, "discount": discount},
             "versions": versions(), "git_commit": git_commit()}, indent=2).encode())

    # --- networks, optimiser, jitted update epoch ---
    data = make_device_dataset(dataset, goal_indices)
    val_data = make_device_dataset(val_dataset, goal_indices) if val_dataset is not None else None
    goal_dim = len(goal_indices)
    sa_encoder, g_encoder, actor = make_networks(args, action_dim)
    actor_optimizer, critic_optimizer = optax.adam(args.actor_lr), optax.adam(args.critic_lr)
    critic_loss_fn, actor_loss_fn = make_losses(args, sa_encoder, g_encoder, actor, alpha)
    key = jax.random.PRNGKey(args.seed)
    key, k_init = jax.random.split(key)
    train_state = init_train_state(k_init, sa_encoder, g_encoder, actor, obs_dim, action_dim, goal_dim,
                                   actor_optimizer, critic_optimizer)
    start_epoch, train_steps_done, wall_offset = 0, 0, 0.0
    if checkpoint is not None:
        train_state = restore_train_state(checkpoint, train_state)
        key = jnp.asarray(checkpoint["key"])
        start_epoch, train_steps_done = checkpoint["epoch"] + 1, checkpoint["train_steps"]
        wall_offset = checkpoint["wall_time"]
    print(f"{SCRIPT}: {len(data['transition_rows'])} transitions, "
          f"{int(dataset['terminals'].sum())} trajectories; params critic "
          f"{param_count(train_state['critic'])}, actor {param_count(train_state['actor'])}", flush=True)

    def update(train_state, batch):
        """One gradient step of critic and actor, both from the same (pre-update) critic."""
        (_, critic_metrics), critic_grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            train_state["critic"], batch)
        (_, actor_metrics), actor_grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
            train_state["actor"], train_state["critic"], batch)
        critic_updates, critic_opt = critic_optimizer.update(critic_grads, train_state["critic_opt"])
        actor_updates, actor_opt = actor_optimizer.update(actor_grads, train_state["actor_opt"])
        train_state = {"critic": optax.apply_updates(train_state["critic"], critic_updates),
                       "actor": optax.apply_updates(train_state["actor"], actor_updates),
                       "critic_opt": critic_opt, "actor_opt": actor_opt}
        return train_state, {**critic_metrics, **actor_metrics}

    def train_epoch(train_state, data, key):
        """`data` is an argument, not a closure: closed-over arrays would be baked into the program."""
        def step(train_state, k):
            return update(train_state, sample_batch(data, k, args.batch_size, discount))
        train_state, metrics = jax.lax.scan(step, train_state, jax.random.split(key, args.eval_every))
        return train_state, jax.tree_util.tree_map(jnp.mean, metrics)

    train_epoch = jax.jit(train_epoch, donate_argnums=(0,))

    @jax.jit
    def validation_metrics(train_state, val_data, key):
        """Losses on a batch of the -val twin: overfitting shows as a gap to training/."""
        batch = sample_batch(val_data, key, args.batch_size, discount)
        _, critic_metrics = critic_loss_fn(train_state["critic"], batch)
        _, actor_metrics = actor_loss_fn(train_state["actor"], train_state["critic"], batch)
        return {**critic_metrics, **actor_metrics}

    if ours:
        @jax.jit
        def evaluate_ours(actor_params, key):
            state_dim = eval_env.state_dim
            act = lambda obs: policy_action(actor, actor_params, obs[:, :state_dim], obs[:, state_dim:])
            return envs.evaluate(eval_env, act, key, args.eval_episodes, args.eval_episode_length or 1000)
    else:
        eval_envs = [probe_env] + [make_ogbench_env(args.env, args.eval_episode_length)
                                   for _ in range(args.eval_episodes - 1)]
        policy = jax.jit(lambda params, obs, goals: policy_action(actor, params, obs, goals))

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
        rows = [r for r in rows if not r.get("summary") and r["epoch"] < start_epoch]
        eval_history = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows]
        write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    from tqdm import tqdm

    num_epochs = args.train_steps // args.eval_every
    start = time.time() - wall_offset
    for epoch in tqdm(range(start_epoch, num_epochs), initial=start_epoch, total=num_epochs, desc=SCRIPT):
        epoch_start = time.time()
        key, k_train, k_val, k_eval = jax.random.split(key, 4)
        train_state, train_metrics = train_epoch(train_state, data, k_train)
        jax.block_until_ready(train_state)
        epoch_time = time.time() - epoch_start
        train_steps_done += args.eval_every
        if ours:
            eval_metrics = evaluate_ours(train_state["actor"], k_eval)
        else:
            actor_params = train_state["actor"]
            eval_metrics = evaluate_ogbench(eval_envs, lambda o, g: policy(actor_params, o, g), args.seed)
        eval_metrics = {f"eval/{k}": float(v) for k, v in eval_metrics.items()}
        eval_history.append(eval_metrics)
        row = {"epoch": epoch, "env_steps": train_steps_done, "train_steps": train_steps_done,
               "wall_time": time.time() - start, "sps": args.eval_every / epoch_time,
               **{f"training/{k}": float(v) for k, v in train_metrics.items()}, **eval_metrics}
        if val_data is not None:
            val_metrics = validation_metrics(train_state, val_data, k_val)
            row.update({f"validation/{k}": float(v) for k, v in val_metrics.items()})
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if wandb_run is not None:
            wandb_run.log(row, step=train_steps_done)
        headline = "eval/episode_success" if ours else "eval/success"
        tqdm.write(f"epoch {epoch} steps {train_steps_done} critic_loss {row['training/critic_loss']:.3f} "
                   f"actor_loss {row['training/actor_loss']:.3f} {headline} {eval_metrics[headline]:.3f}")
        save_checkpoint(os.path.join(run_path, "checkpoint.pkl"), args, train_state, key, epoch, train_steps_done,
                        time.time() - start)

    last5 = eval_history[-5:]
    summary = {"summary": True, **{f"{k}_last5": float(np.mean([e[k] for e in last5])) for k in last5[0]}}
    with open(metrics_path, "a") as f:
        f.write(json.dumps(summary) + "\n")
    write_atomic(os.path.join(run_path, "summary.json"), json.dumps(summary, indent=2).encode())
    if wandb_run is not None:
        wandb_run.summary.update(summary)
        wandb_run.finish()
