"""Env steps/s of crl_deep.py with --num-seeds 1 vs N in one process: JSON lines on stdout (a benchmark).

    python bench/seeds.py                                  # N = 1 and 4, reacher, depth 4, width 256
    python bench/seeds.py --num-seeds 1 2 4 8 --depth 16 --rounds 7

For each seed count it builds what crl_deep.py's __main__ builds (seed-stacked carry, the epoch
compiled once for all seeds, vmapped over the seed axis), prefills the buffers, runs one warm-up
epoch, then times `rounds` epochs per seed count, interleaved (1, N, 1, N, ...) so that load from
elsewhere hits them alike. One line per seed count: env steps/s of all seeds together (median and
best round), seconds per epoch, compile seconds; a last line with the ratios to --num-seeds 1 of the
aggregate env steps/s (above 1: several seeds in one process beat one seed at a time).
The epochs keep the paper's update-to-data ratio by default (~40 env steps per SGD step).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import jax
import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import crl_deep as C  # noqa: E402
import runkit  # noqa: E402


@dataclass
class BenchArgs:
    num_seeds: list[int] = field(default_factory=lambda: [1, 4])
    """seed counts to compare (the first is the baseline of the ratios)"""
    env: str = "reacher"
    """environment"""
    depth: int = 4
    """tower depth"""
    width: int = 256
    """tower width"""
    batch_size: int = 256
    """SGD batch"""
    num_envs: int = 32
    """training envs per seed"""
    unroll_length: int = 10
    """env steps per env between SGD blocks"""
    sgd_steps_per_train_step: int = 8
    """SGD steps per unroll (32 envs x 10 steps / 8 = 40 env steps per SGD step, the paper's ratio)"""
    train_steps_per_epoch: int = 4
    """training steps (unroll + SGD block) per timed epoch"""
    rounds: int = 5
    """timed epochs per seed count"""


def build(args: C.Args):
    """(compiled epoch, prefilled carry, compile seconds) as crl_deep.py's __main__ builds them."""
    import envs

    raw_env = envs.make(args.env)
    env = envs.wrap_for_training(raw_env, episode_length=args.episode_length)
    stepper = jax.jit(env.step)
    dims = C.Dims(raw_env.state_dim, tuple(int(i) for i in raw_env.goal_indices), raw_env.action_size)
    nets = C.build_networks(args, raw_env.observation_size, len(dims.goal_indices), dims.action_size)
    optimizers = C.make_optimizers(args)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    key, k_init, k_reset, _ = runkit.seed_keys(args.seed, args.num_seeds)

    def make_carry(k_init, k_reset, key):
        return {
            "train_state": C.init_train_state(k_init, nets, optimizers, args, dims),
            "buffer": C.buffer_init(args.replay_size, args.num_envs, dims.state_dim, dims.action_size),
            "env_state": env.reset(jax.random.split(k_reset, args.num_envs)),
            "key": key,
        }

    if args.num_seeds > 1:
        make_carry = jax.vmap(make_carry)
    carry_shapes = jax.eval_shape(make_carry, k_init, k_reset, key)
    shardings = runkit.carry_shardings(carry_shapes, mesh, args.num_envs, args.num_seeds)
    carry = jax.jit(make_carry, out_shardings=shardings)(k_init, k_reset, key)
    start = time.time()
    epoch_fn = C.compile_epoch(carry_shapes, shardings, mesh, stepper, nets, optimizers, args, dims)
    compile_seconds = time.time() - start
    carry = C.run_prefill(carry, shardings, stepper, nets, args, dims, mesh)
    return epoch_fn, carry, compile_seconds


def main(bench: BenchArgs):
    prefill = 1  # unroll per env before training
    per_epoch = bench.train_steps_per_epoch * bench.num_envs * bench.unroll_length
    base = C.Args(
        env=bench.env,
        depth=bench.depth,
        width=bench.width,
        batch_size=bench.batch_size,
        num_envs=bench.num_envs,
        unroll_length=bench.unroll_length,
        sgd_steps_per_train_step=bench.sgd_steps_per_train_step,
        min_replay_size=prefill * bench.unroll_length,
        replay_size=max(1000, prefill * bench.unroll_length),
        episode_length=1000,
        num_epochs=1,
        total_env_steps=prefill * bench.unroll_length * bench.num_envs + per_epoch,
    )
    assert runkit.train_steps_per_epoch(base) == bench.train_steps_per_epoch
    built = {}
    for n in bench.num_seeds:
        args = replace(base, num_seeds=n)
        C.check_args(args)
        epoch_fn, carry, compile_seconds = build(args)
        carry, _ = epoch_fn(carry)  # warm-up
        jax.block_until_ready(carry)
        built[n] = {"fn": epoch_fn, "carry": carry, "compile_s": compile_seconds, "seconds": []}
    for _ in range(bench.rounds):
        for b in built.values():
            start = time.perf_counter()
            b["carry"], metrics = b["fn"](b["carry"])
            jax.block_until_ready((b["carry"], metrics))
            b["seconds"].append(time.perf_counter() - start)
    device = f"{jax.default_backend()} x{jax.device_count()} ({jax.devices()[0].device_kind})"
    rates = {}
    for n, b in built.items():
        median, best = statistics.median(b["seconds"]), min(b["seconds"])
        rates[n] = n * per_epoch / median
        line = {
            "num_seeds": n,
            "env_steps_per_s": rates[n],
            "env_steps_per_s_best": n * per_epoch / best,
            "env_steps_per_s_per_seed": per_epoch / median,
            "epoch_s_median": median,
            "compile_s": b["compile_s"],
            "env_steps_per_epoch_per_seed": per_epoch,
            "sgd_steps_per_epoch_per_seed": bench.train_steps_per_epoch * bench.sgd_steps_per_train_step,
            "device": device,
        }
        print(json.dumps(line), flush=True)
    first = bench.num_seeds[0]
    ratios = {f"{n}_vs_{first}": rates[n] / rates[first] for n in bench.num_seeds[1:]}
    config = {k: v for k, v in vars(bench).items() if k not in ("num_seeds", "rounds")}
    print(json.dumps({"aggregate_env_steps_per_s_ratio": ratios, "rounds": bench.rounds, **config}), flush=True)


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
