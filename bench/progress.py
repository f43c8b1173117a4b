"""What the in-epoch progress bar costs: crl_deep's jitted epoch with and without `runkit.progress` (a host
callback per training step that moves the bar), timed in interleaved rounds; one JSON line.

    taskset -c 1 python bench/progress.py                       # a worst case: small steps, many callbacks
    taskset -c 1 python bench/progress.py --depth 16 --width 256 --batch-size 256

The epoch is crl_deep.train_epoch on reacher (collect + insert + sample + SGD). A RunLog is open, so every
callback also updates a real tqdm bar (written to a null stream).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import crl_deep as C  # noqa: E402
import runkit  # noqa: E402


def compiled_epoch(args: C.Args, with_progress: bool):
    """(the compiled epoch, its initial carry): crl_deep's own build, prefill and epoch."""
    key, k_init, k_reset, _ = runkit.seed_keys(args.seed, 1)
    env_step, dims, nets, optimizers, mesh, make_carry, shapes, shardings = C.build(args, k_init, k_reset, key)
    original = runkit.progress
    if not with_progress:
        runkit.progress = lambda step: None  # read when the epoch is traced
    try:
        epoch = C.compile_epoch(shapes, shardings, mesh, env_step, nets, optimizers, args, dims)
    finally:
        runkit.progress = original
    carry = jax.jit(make_carry, out_shardings=shardings)(k_init, k_reset, key)
    return epoch, C.run_prefill(carry, shardings, env_step, nets, args, dims, mesh)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=40, help="training steps (callbacks) per epoch")
    p.add_argument("--sgd-steps", type=int, default=8, help="SGD steps per training step")
    p.add_argument("--rounds", type=int, default=5)
    bench = p.parse_args()
    num_envs, unroll = 32, 10
    args = C.Args(
        env="reacher", depth=bench.depth, width=bench.width, batch_size=bench.batch_size, num_envs=num_envs,
        unroll_length=unroll, sgd_steps_per_train_step=bench.sgd_steps, replay_size=1000, min_replay_size=20,
        episode_length=1000, num_epochs=1, total_env_steps=(2 + bench.train_steps) * num_envs * unroll,
    )  # fmt: skip
    assert runkit.train_steps_per_epoch(args) == bench.train_steps
    variants = {name: list(compiled_epoch(args, name == "progress")) for name in ("progress", "no_progress")}
    folder = tempfile.mkdtemp()
    log = runkit.RunLog(args, "crl_deep", folder, 0, 10**6, bench.train_steps)
    log.bar.fp = open(os.devnull, "w")
    times = {name: [] for name in variants}
    epochs = log.epochs
    for v in variants.values():  # warm-up round
        v[1], _ = jax.block_until_ready(v[0](v[1]))
    for _ in range(bench.rounds):
        for name, v in variants.items():
            next(epochs)
            start = time.perf_counter()
            v[1], metrics = v[0](v[1])
            jax.block_until_ready(metrics)
            jax.effects_barrier()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    line = {
        "kind": "progress_overhead",
        "depth": bench.depth,
        "width": bench.width,
        "batch": bench.batch_size,
        "train_steps_per_epoch": bench.train_steps,
        "sgd_steps_per_train_step": bench.sgd_steps,
        "epoch_s_best": {k: round(v, 4) for k, v in best.items()},
        "epoch_s_median": {k: round(sorted(t)[len(t) // 2], 4) for k, t in times.items()},
        "overhead_best": round(best["progress"] / best["no_progress"] - 1, 4),
        "callback_us_best": round(1e6 * (best["progress"] - best["no_progress"]) / bench.train_steps, 1),
        "jax": jax.__version__,
    }
    print(json.dumps(line), flush=True)
