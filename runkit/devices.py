"""Devices, processes and seeds: the backend line, multi-process start, matmul precision, peak memory, and
the seed axis (--num-seeds: several independent agents stacked along a leading axis)."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec


def init_distributed():
    """A multi-process run (one process per host, or several on one machine) when JAX_COORDINATOR_ADDRESS
    is set; JAX_NUM_PROCESSES and JAX_PROCESS_ID give the process count and this process's index where the
    cluster does not (SLURM and Open MPI do). CPU collectives across processes use gloo."""
    if "JAX_COORDINATOR_ADDRESS" not in os.environ:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=int(count) if count else None, process_id=int(index) if index else None)


def apply_matmul_precision(args):
    """--matmul-precision float32: every float32 matmul of the process in full float32 (jax's default on
    NVIDIA Ampere/Hopper GPUs is TensorFloat32; on CPU it is float32 anyway). "default" and "bfloat16"
    leave jax's setting alone (bfloat16 is the towers' Dense dtype)."""
    if args.matmul_precision == "float32":
        jax.config.update("jax_default_matmul_precision", "float32")


def log_backend(script: str):
    """One stderr line naming the backend and devices, so a GPU run that fell back to the CPU is seen at once."""
    devices = ", ".join(f"{d} ({d.device_kind})" for d in jax.devices())
    backend = f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)"
    print(f"{script}: {backend}: {devices}", file=sys.stderr, flush=True)


def device_peak_memory(devices=None) -> dict:
    """{"device_peak_bytes": the largest peak of bytes in use over `devices`} where the backend counts it
    (GPU, TPU), else {} (jax's CPU devices report no memory stats)."""
    stats = [d.memory_stats() for d in (jax.local_devices() if devices is None else devices)]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    return {"device_peak_bytes": max(peaks)} if peaks else {}


def data_mesh() -> Mesh:
    """Every device on one 'data' axis: envs, buffers and batches split along it, or whole seeds."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def compile_beside(compile_fn, build_fn, *build_args):
    """(compile_fn(), its seconds, build_fn(*build_args)), the build in a thread while XLA compiles: XLA
    releases the GIL while it compiles, so building the initial state (its own compile, env resets, random
    draws) overlaps."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(build_fn, *build_args)
        start = time.time()
        compiled = compile_fn()
        return compiled, time.time() - start, pending.result()


# ---- the seed axis ----------------------------------------------------------------------------------
def per_seed(fn, mesh: Mesh):
    """`fn` of one seed's pytree applied to seed-stacked pytrees: vmapped over the leading seed axis, each
    device running its own whole seeds (shard_map: seeds never communicate)."""
    from jax.experimental.shard_map import shard_map

    by_seed = PartitionSpec("data")
    return shard_map(jax.vmap(fn), mesh=mesh, in_specs=by_seed, out_specs=by_seed, check_rep=False)


def seed_keys(seed: int, num_seeds: int, count: int = 4):
    """`count` keys as a run of `seed` splits its PRNGKey into; with num_seeds > 1 each a [num_seeds, 2]
    stack of the keys runs of seed, seed + 1, ... would use."""
    keys = [jax.random.split(jax.random.PRNGKey(seed + i), count) for i in range(num_seeds)]
    return tuple(keys[0] if num_seeds == 1 else jnp.stack(keys, axis=1))


def eval_key(eval_key_base, epoch: int):
    """The evaluation key of `epoch` (each seed's own, for a seed-stacked base key)."""
    if eval_key_base.ndim > 1:
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(eval_key_base, epoch)
    return jax.random.fold_in(eval_key_base, epoch)


def seed_rows(metrics: dict) -> list:
    """Metrics of the device (scalars, or [num_seeds] arrays) as one dict of floats per seed."""
    metrics = {k: np.atleast_1d(v) for k, v in jax.device_get(metrics).items()}
    num_seeds = len(next(iter(metrics.values())))
    return [{k: float(v[i]) for k, v in metrics.items()} for i in range(num_seeds)]


# ---- how long the first epoch will take --------------------------------------------------------------
STEP_SHARE = 0.45  # an SGD step's dense FLOPs run at about this share of the matmul probe (CPU; bench/RESULTS.md)


def matmul_rate(batch: int, width: int, layers: int = 16) -> float:
    """FLOP/s of this backend on a chain of `layers` float32 [batch, width] x [width, width] matmuls, the
    towers' own shape (best of 3 after a warm-up; about a second)."""
    x, ws = jnp.ones((batch, width)), jnp.full((layers, width, width), 1.0 / width)
    chain = jax.jit(lambda x, ws: jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0])
    jax.block_until_ready(chain(x, ws))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(chain(x, ws))
        best = min(best, time.perf_counter() - start)
    return 2 * batch * width * width * layers / best


PROGRESS = {"in_epoch": True}  # runkit.progress traces its callback (estimate_epoch turns it off for short epochs)


def estimate_epoch(script: str, flops_per_epoch: float, batch: int, width: int, limit_s: float = 600.0):
    """Seconds the first epoch's SGD steps should take: the dry-run FLOP count over a quick rate probe (None
    for epochs under 1e12 FLOPs, not probed). Above `limit_s` it says so on stderr, in one line. Below 1e12 no
    in-epoch progress is traced: a host callback keeps jax's persistent compilation cache from storing the epoch."""
    PROGRESS["in_epoch"] = flops_per_epoch >= 1e12
    if flops_per_epoch < 1e12:
        return None
    rate = matmul_rate(batch, width)
    seconds = flops_per_epoch / (rate * STEP_SHARE)
    if seconds > limit_s:
        took = f"{seconds / 3600:.1f} h" if seconds > 3600 else f"{seconds / 60:.0f} min"
        on_cpu = "; these settings are meant for a GPU" if jax.default_backend() == "cpu" else ""
        print(
            f"{script}: the first epoch will take about {took}: {flops_per_epoch:.2g} dense FLOPs of SGD steps "
            f"(the --dry-run count) at {STEP_SHARE:.0%} (a step's share) of the {rate / 1e9:.0f} GFLOP/s a "
            f"[{batch}, {width}] matmul chain reaches here{on_cpu}",
            file=sys.stderr,
            flush=True,
        )
    return seconds
