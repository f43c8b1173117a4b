"""What every online script's run shares: the paper's loop schedule (prefill, then epochs of training
steps, each an unroll of every env and a block of SGD steps), its checks, the carry's shardings and what a
checkpoint of the carry {"train_state", "buffer", "env_state", "key"} holds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from runkit.checks import check_common, fail
from runkit.devices import per_seed


def prefill_unrolls(args) -> int:
    """Unrolls of the initial policy that put at least --min-replay-size steps per env in the buffer."""
    return -(-args.min_replay_size // args.unroll_length)


def train_steps_per_epoch(args) -> int:
    """Training steps (an unroll, then --sgd-steps-per-train-step SGD steps) per epoch, after the prefill."""
    prefill_steps = prefill_unrolls(args) * args.unroll_length * args.num_envs
    return (args.total_env_steps - prefill_steps) // (args.num_epochs * args.num_envs * args.unroll_length)


def check_online(args, env_ids=None, num_devices=None):
    """Env ids (default envs.ENV_IDS), the shared range checks (check_common), the split over the devices
    (default jax.device_count(); envs and batch, or whole seeds with --num-seeds) and the schedule."""
    if env_ids is None:
        import envs

        env_ids = envs.ENV_IDS
    num_devices = num_devices or jax.device_count()
    if args.env not in env_ids:
        fail(f"unknown env {args.env!r}; valid: {', '.join(env_ids)}")
    if getattr(args, "eval_env", None) is not None and args.eval_env not in env_ids:
        fail(f"unknown eval env {args.eval_env!r}; valid: {', '.join(env_ids)}")
    check_common(args)
    if getattr(args, "num_seeds", 1) > 1:  # whole seeds per device (shard_map), so envs and batch need not divide
        if args.num_seeds % num_devices:
            fail(f"--num-seeds {args.num_seeds} is not divisible by the {num_devices} devices (whole seeds per device)")
        if jax.process_count() > 1:
            fail("--num-seeds > 1 runs in one process (several processes: one seed each, --num-seeds 1)")
    else:
        if args.num_envs % num_devices:
            fail(f"--num-envs {args.num_envs} is not divisible by the {num_devices} devices")
        if args.batch_size % num_devices:
            fail(f"--batch-size {args.batch_size} is not divisible by the {num_devices} devices")
    if train_steps_per_epoch(args) < 1:
        needed = (prefill_unrolls(args) + args.num_epochs) * args.unroll_length * args.num_envs
        fail(f"--total-env-steps {args.total_env_steps} leaves no training step per epoch: need at least {needed}")


def carry_shardings(carry: dict, mesh, num_envs: int, num_seeds: int = 1):
    """Envs and buffer split over the mesh's 'data' axis along the env dimension (the buffer is time-major:
    [capacity, num_envs, ...]); the rest replicated. A seed-stacked carry (num_seeds > 1) is split along its
    seed axis instead: whole seeds per device."""
    if num_seeds > 1:
        return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, PartitionSpec("data")), carry)
    replicated = NamedSharding(mesh, PartitionSpec())
    by_env, buffer_by_env = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec(None, "data"))
    out = jax.tree_util.tree_map(lambda _: replicated, carry)
    if "env_state" in carry:
        env_leaf = lambda x: by_env if x.ndim >= 1 and x.shape[0] == num_envs else replicated
        out["env_state"] = jax.tree_util.tree_map(env_leaf, carry["env_state"])
    if "buffer" in carry:
        out["buffer"] = {k: buffer_by_env if v.ndim >= 2 else replicated for k, v in carry["buffer"].items()}
    return out


def checkpoint_state(carry: dict) -> dict:
    """What a checkpoint of an online run holds: the network params, the rest of the train state (optimizer
    states, targets, temperatures), the env state and the key. The replay buffer is not in it."""
    rest = {k: v for k, v in carry["train_state"].items() if k != "params"}
    return {
        "params": carry["train_state"]["params"],
        "train_state": rest,
        **{k: carry[k] for k in ("env_state", "key")},
    }


def resumed_carry(saved: dict, buffer, shardings) -> dict:
    """The carry of a checkpoint's state (restore_state of `checkpoint_state`'s layout) and a buffer, as
    fresh device arrays: on CPU device_put may alias numpy arrays, which a donated epoch would overwrite."""
    train_state = {"params": saved["params"], **saved["train_state"]}
    carry = {"train_state": train_state, "buffer": buffer, "env_state": saved["env_state"], "key": saved["key"]}
    return jax.jit(lambda c: jax.tree_util.tree_map(jnp.copy, c), out_shardings=shardings)(carry)


def over_seeds(fn, mesh, num_seeds: int):
    """`fn` of one agent's pytree, or with num_seeds > 1 of seed-stacked pytrees (runkit.per_seed)."""
    return per_seed(fn, mesh) if num_seeds > 1 else fn
