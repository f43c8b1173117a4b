"""Throughput of crl_deep.py by depth: JSON lines on stdout (a benchmark, not a test).

    python bench/crl_throughput.py                          # depths 4 16 64 256 1024, width/batch 256
    python bench/crl_throughput.py --depths 4 64 --sgd-steps 5
    taskset -c 1 python bench/crl_throughput.py --depths 16 --variants scan no_adam no_layer_norm relu dot_energy \
        --no-whole-loop                                     # where the step's time goes (breakdown line)
    taskset -c 1 python bench/crl_throughput.py --energy-check      # the L2 energy matrix three ways
    python bench/crl_throughput.py --memory-depths 4 64 1024        # XLA's compiled memory analysis

Per depth and network variant (scan = crl_deep's default build, remat = --remat, save_all = the scan
keeping every intermediate for the backward pass (crl_deep's build before it recomputed LayerNorm/swish),
unrollN = --scan-unroll N, loop = residual blocks as a plain Python loop, as in the paper's code,
bfloat16 = the default build with --matmul-precision bfloat16) it
prints the compile seconds and the rate of the jitted SGD step (fixed batch: only the networks
are measured), timed in `rounds` rounds interleaved across the variants of a depth so that load from
elsewhere hits them alike (median and best round), the achieved GFLOP/s of the dense layers and the
fraction of this machine's measured float32 matmul peak (the larger of a 2048^3 product and a chain
of 256x256 layers at batch 256, best of 3 each). For the non-loop variants it also compiles and runs
crl_deep.train_epoch on reacher (collect + insert + sample + SGD) at the paper's update-to-data
ratio (~40 env steps per SGD step) and reports env steps/s of that loop, its compile seconds and
XLA's memory estimate, and start-to-first-update (init, overlapped with the compile as crl_deep
does it, + compile + first SGD step; init_s and first_step_s are also given).

Besides wall-clock rates it reports steps per CPU second of its own process: pinned to one core on a
shared machine, that is the step's cost whatever else runs (see docs/performance.md).

FLOPs counted per SGD step (dense layers only, 2*B*in*out per forward layer): critic update =
3 x (phi + psi) forward (forward + input and weight gradients); actor update = 3 x actor + phi
forward + phi input gradient (2 x phi); psi(g) is shared between the two updates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import flax.linen as nn
import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import crl_deep as C  # noqa: E402
import runkit  # noqa: E402

VARIANTS = (
    "scan", "remat", "save_all", "unroll1", "unroll2", "unroll4", "unroll8", "unroll16", "loop",
    "no_adam", "no_layer_norm", "relu", "dot_energy", "autodiff_energy", "bfloat16", "flat_adam", "transposed_dots",
)  # fmt: skip
# Sizes of the networks' inputs (state, goal indices, action) without building an env: network-only runs need
# no brax or mujoco (a GPU machine with only jax, flax and optax runs them).
SIZES = {"reacher": (10, (4, 5, 6), 2), "ant": (29, (0, 1), 8), "humanoid": (268, (0, 1, 2), 17)}
# One device call of under 10 minutes: the SGD step at the paper's deep settings on a GPU.
PRESETS = {
    "gpu": dict(
        depths=[64, 256, 1024], batch_size=512, variants=["scan", "unroll2", "unroll8", "loop", "bfloat16"],
        sizes="humanoid", whole_loop=False, rounds=2, sgd_steps=10, seconds_per_measurement=5.0,
    ),
}  # fmt: skip


def parse_bench_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="a prepared set of the flags below (gpu: see PRESETS)")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64, 256, 1024], help="depths to measure")
    p.add_argument("--width", type=int, default=256, help="tower width")
    p.add_argument("--batch-size", type=int, default=256, help="SGD batch")
    p.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=["scan", "remat", "save_all", "loop"],
        help="network builds to compare: scan = crl_deep's default, remat = --remat, save_all = the scan saving "
        "every intermediate, unrollN = --scan-unroll N, loop = a Python loop of blocks, bfloat16 = "
        "--matmul-precision bfloat16. Profiling by subtraction (other math, timed only to see what a part "
        "costs): no_adam = plain SGD instead of Adam, no_layer_norm, relu instead of swish, dot_energy = the "
        "[B, B] dot product instead of the L2 energy; autodiff_energy = the energy matrix's gradient left to "
        "autodiff (crl_deep before its hand-written pairwise_sq_dist backward). Candidates, the same math: "
        "flat_adam = each Adam over one flat vector of its network's parameters (optax.flatten), "
        "transposed_dots = every Dense's backward matmuls on explicitly transposed copies (g @ w^T, x^T @ g)",
    )  # fmt: skip
    p.add_argument("--sizes", choices=sorted(SIZES), default="reacher", help="the env whose input sizes the nets get")
    p.add_argument(
        "--energy-check", action="store_true",
        help="instead of the timings: the L2 energy matrix's forward+backward three ways (error and time)",
    )  # fmt: skip
    p.add_argument(
        "--memory-depths", type=int, nargs="*", default=[],
        help="instead of the timings: XLA's compiled memory analysis of the SGD step at these depths",
    )  # fmt: skip
    p.add_argument("--memory-batches", type=int, nargs="+", default=[256, 512], help="batches of the memory analysis")
    p.add_argument(
        "--memory-precisions", nargs="+", choices=["default", "bfloat16"], default=["default", "bfloat16"],
        help="--matmul-precision values of the memory analysis",
    )  # fmt: skip
    p.add_argument("--loop-max-depth", type=int, default=64, help="the Python loop compiles in minutes beyond this")
    p.add_argument("--sgd-steps", type=int, default=10, help="SGD steps timed per round")
    p.add_argument("--seconds-per-measurement", type=float, default=20.0, help="cap on the timed steps of one round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant, interleaved across variants")
    p.add_argument(
        "--whole-loop", action=argparse.BooleanOptionalAction, default=True,
        help="also measure crl_deep.train_epoch on reacher (imports envs: brax and mujoco)",
    )  # fmt: skip
    p.add_argument("--num-envs", type=int, default=32, help="envs of the whole-loop measurement")
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = p.parse_known_args(argv)[0].preset
    if preset:  # the preset's values, then any flag given on the command line on top
        p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


def environment_line() -> dict:
    """What the figures were measured on: versions, backend, devices, and on NVIDIA GPUs the driver."""
    from importlib import metadata

    line = {"kind": "environment", "python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            line[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            line[name] = None
    device = jax.devices()[0]
    line.update(backend=jax.default_backend(), device_kind=device.device_kind, device_count=jax.device_count())
    line["platform_version"] = getattr(device.client, "platform_version", None)  # e.g. the CUDA version
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        line["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        line["nvidia_smi"] = None
    line["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return line


class ComparisonTower(nn.Module):
    """crl_deep.Tower with no checkpointing, its blocks either scanned (save_all: the scan stacks
    every intermediate) or a Python loop (loop: compile time grows with depth)."""

    depth: int
    width: int
    python_loop: bool

    @nn.compact
    def __call__(self, x):
        x = nn.swish(nn.LayerNorm()(nn.Dense(self.width, kernel_init=C.kernel_init)(x)))
        if self.python_loop:
            for i in range(self.depth // 4):
                x, _ = C.ResidualBlock(self.width, True, "swish", name=f"block_{i}")(x, None)
            return x
        blocks = nn.scan(
            C.ResidualBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth // 4
        )
        x, _ = blocks(self.width, True, "swish", name="blocks")(x, None)
        return x


def scan_unroll(variant: str, depth: int) -> int:
    """--scan-unroll of a variant: N for unrollN, crl_deep's default otherwise."""
    if variant.startswith("unroll"):
        return int(variant[len("unroll") :])
    return C.Args(depth=depth).scan_unroll


def matmul_precision(variant: str) -> str:
    """--matmul-precision of a variant: bfloat16 for the bfloat16 variant, crl_deep's default otherwise."""
    return "bfloat16" if variant == "bfloat16" else C.Args().matmul_precision


def build(variant: str, depth: int, width: int, dims: C.Dims, args: C.Args) -> C.Networks:
    if variant in ("loop", "save_all"):

        def tower():
            return ComparisonTower(depth, width, python_loop=variant == "loop")

        return C.Networks(
            C.Actor(tower(), dims.action_size), C.Encoder(tower(), args.repr_dim), C.Encoder(tower(), args.repr_dim)
        )
    return C.build_networks(args, 0, 0, dims.action_size)


def dense_flops(batch: int, sizes: list[tuple[int, int]]) -> int:
    return sum(2 * batch * i * o for i, o in sizes)


def tower_sizes(in_size: int, depth: int, width: int, out: int) -> list[tuple[int, int]]:
    return [(in_size, width)] + [(width, width)] * depth + [(width, out)]


def sgd_flops(depth: int, width: int, batch: int, dims: C.Dims, repr_dim: int) -> int:
    goal = len(dims.goal_indices)
    actor = dense_flops(batch, tower_sizes(dims.state_dim + goal, depth, width, 2 * dims.action_size))
    phi = dense_flops(batch, tower_sizes(dims.state_dim + dims.action_size, depth, width, repr_dim))
    psi = dense_flops(batch, tower_sizes(goal, depth, width, repr_dim))
    return 3 * (phi + psi) + 3 * actor + 2 * phi


def xla_peak_bytes(memory) -> int:
    """Arguments + outputs - aliased (donated) + temporaries of a compiled program's memory analysis."""
    return int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


def timed(fn, *xs):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*xs))
    return out, time.perf_counter() - start


def matmul_peak() -> dict:
    """Dense float32 GFLOP/s: one 2048^3 product, and a chain of 64 256x256 layers at batch 256."""
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (2048, 2048))
    mm = jax.jit(lambda a: a @ a)
    timed(mm, a)
    t = min(timed(lambda a: [mm(a) for _ in range(10)][-1], a)[1] for _ in range(3))
    big = 10 * 2 * 2048**3 / t / 1e9
    ws = jax.random.normal(key, (64, 256, 256)) / 16
    x = jax.random.normal(key, (256, 256))
    chain = jax.jit(lambda x, ws: jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0])
    timed(chain, x, ws)
    t = min(timed(lambda x: [chain(x, ws) for _ in range(10)][-1], x)[1] for _ in range(3))
    small = 10 * 64 * 2 * 256**3 / t / 1e9
    cpu_times = []
    for _ in range(3):
        cpu_start = time.process_time()
        jax.block_until_ready([chain(x, ws) for _ in range(10)])
        cpu_times.append(time.process_time() - cpu_start)
    small_cpu = 10 * 64 * 2 * 256**3 / min(cpu_times) / 1e9
    return {
        "kind": "matmul_peak",
        "gflops_2048": round(big, 1),
        "gflops_chain_256": round(small, 1),
        "gflops_chain_256_per_cpu_s": round(small_cpu, 1),
        "peak_gflops": round(max(big, small), 1),
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


@jax.custom_vjp
def _transposed_dot(x, w):
    return x @ w


def _transposed_dot_fwd(x, w):
    return x @ w, (x, w)


def _transposed_dot_bwd(residuals, g):
    """The Dense backward on materialised transposes (an optimization barrier stops XLA folding them back
    into the dot's dimension numbers): both products then run in the layout of a forward matmul."""
    x, w = residuals
    w_t, x_t = jax.lax.optimization_barrier((jax.numpy.transpose(w), jax.numpy.transpose(x)))
    return g @ w_t, x_t @ g


_transposed_dot.defvjp(_transposed_dot_fwd, _transposed_dot_bwd)


def transposed_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    assert x.ndim == 2 and dimension_numbers == (((1,), (0,)), ((), ())), dimension_numbers
    return _transposed_dot(x, w)


class TransposedDense(nn.Dense):
    dot_general: object = transposed_dot_general


TransposedDense.__name__ = "Dense"  # flax names a layer after its class: the same parameter tree as nn.Dense


def with_dense(dense, fn):
    """Calls fn (which traces the networks) with flax's Dense replaced by `dense` (None: unchanged)."""
    if dense is None:
        return fn()
    original = nn.Dense
    nn.Dense = dense
    try:
        return fn()
    finally:
        nn.Dense = original


def with_autodiff_energy(fn):
    """Calls fn with crl_deep.energy's l2 kinds taken on a [B, B, D] difference tensor by autodiff."""
    energy = C.energy

    def old_energy(sa_repr, g_repr, kind):
        if kind in ("l2", "l2_squared"):
            return C.energy_rowwise(sa_repr[:, None, :], g_repr[None, :, :], kind)
        return energy(sa_repr, g_repr, kind)

    C.energy = old_energy
    try:
        return fn()
    finally:
        C.energy = energy


def prepare_sgd(variant: str, depth: int, bench: argparse.Namespace, dims: C.Dims) -> dict:
    """Compiles the jitted SGD step of one variant and runs it once.

    Start-to-first-update is timed the way crl_deep's main starts: the train state is built (its
    compile and its random draws) in a background thread while the step compiles from shapes alone.
    """
    args = C.Args(
        depth=depth,
        width=bench.width,
        batch_size=bench.batch_size,
        remat=variant == "remat",
        scan_unroll=scan_unroll(variant, depth),
        layer_norm=variant != "no_layer_norm",
        activation="relu" if variant == "relu" else "swish",
        energy="dot" if variant == "dot_energy" else "l2",
        matmul_precision=matmul_precision(variant),
    )
    nets = build(variant, depth, bench.width, dims, args)
    key = jax.random.PRNGKey(0)
    b = bench.batch_size
    batch = {
        "state": jax.random.normal(key, (b, dims.state_dim)),
        "action": jax.random.uniform(key, (b, dims.action_size), minval=-1, maxval=1),
        "goal": jax.random.normal(key, (b, len(dims.goal_indices))),
    }
    optimizers = C.make_optimizers(args)
    if variant == "no_adam":  # one fused scale-and-add pass over the parameters instead of Adam's
        optimizers = C.Optimizers(optax.sgd(1e-6), optax.sgd(1e-6), optax.sgd(1e-6))
    if variant == "flat_adam":
        optimizers = C.Optimizers(
            *(optax.flatten(optax.adam(lr)) for lr in (args.actor_lr, args.critic_lr)), optimizers.alpha
        )
    init = jax.jit(lambda k: C.init_train_state(k, nets, optimizers, args, dims))
    # The batch is an argument, as in crl_deep (sampled from the buffer): closed over as a constant it
    # made XLA's compile 1.5x longer (depth 1024: 13.0 s vs 8.8 s).
    step = jax.jit(lambda s, bt, k: C.sgd_step(s, bt, k, nets, optimizers, args), donate_argnums=0)
    if variant == "autodiff_energy":  # traced during the compile below, with crl_deep's old energy matrix
        step = jax.jit(
            lambda s, bt, k: with_autodiff_energy(lambda: C.sgd_step(s, bt, k, nets, optimizers, args)),
            donate_argnums=0,
        )

    def build_state():
        state = jax.block_until_ready(init(key))
        return state, time.perf_counter() - start

    start = time.perf_counter()
    state_shapes = init.eval_shape(key)  # traces init once; the thread's call reuses the trace
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(build_state)
        dense = TransposedDense if variant == "transposed_dots" else None
        step = with_dense(dense, lambda: step.lower(state_shapes, batch, key).compile())
        compile_s = time.perf_counter() - start
        memory = step.memory_analysis()
        state, init_s = pending.result()
    (state, _), first_step_s = timed(step, state, batch, key)
    start_to_first_update_s = time.perf_counter() - start
    n = max(1, min(bench.sgd_steps, int(bench.seconds_per_measurement / max(first_step_s, 1e-3))))
    return {
        "variant": variant,
        "depth": depth,
        "args": args,
        "fn": lambda s, k: step(s, batch, k),
        "state": state,
        "keys": list(jax.random.split(key, n)),
        "n": n,
        "compile_s": compile_s,
        "xla_peak_mib": None if memory is None else round(xla_peak_bytes(memory) / 2**20, 1),
        "init_s": init_s,
        "first_step_s": first_step_s,
        "round_s": [],
        "round_cpu_s": [],
        "start_to_first_update_s": start_to_first_update_s,
    }


def time_round(m: dict):
    """n SGD steps, one dispatch each (dispatch costs microseconds; a step, milliseconds)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    for k in m["keys"]:
        m["state"], metrics = m["fn"](m["state"], k)
    jax.block_until_ready(metrics)
    m["round_s"].append(time.perf_counter() - start)
    m["round_cpu_s"].append(time.process_time() - cpu_start)
    assert np.isfinite(float(metrics["critic_loss"]))


def sgd_line(m: dict, bench: argparse.Namespace, dims: C.Dims, peak: dict) -> dict:
    rate, best = m["n"] / float(np.median(m["round_s"])), m["n"] / min(m["round_s"])
    gflops = sgd_flops(m["depth"], bench.width, bench.batch_size, dims, m["args"].repr_dim) * rate / 1e9
    return {
        "kind": "sgd",
        "variant": m["variant"],
        "depth": m["depth"],
        "width": bench.width,
        "batch": bench.batch_size,
        "compile_s": round(m["compile_s"], 2),
        "sgd_steps_per_s": round(rate, 3),
        "sgd_steps_per_s_best_round": round(best, 3),
        # CPU seconds of this process (all its threads): on a shared machine, pinned to one core
        # (taskset -c N), steps per CPU second are what the step costs, whatever else runs
        "sgd_steps_per_cpu_s": round(m["n"] / float(np.median(m["round_cpu_s"])), 3),
        "timed_steps": m["n"],
        "rounds": len(m["round_s"]),
        "gflops": round(gflops, 1),
        "fraction_of_matmul_peak": round(gflops / peak["peak_gflops"], 3),
        "fraction_of_2048_matmul": round(gflops / peak["gflops_2048"], 3),
        "init_s": round(m["init_s"], 2),
        "first_step_s": round(m["first_step_s"], 2),
        "start_to_first_update_s": round(m["start_to_first_update_s"], 2),
        # XLA's estimate for this program (arguments + outputs - aliased + temporaries), and the device's own
        # peak so far in this process (GPU/TPU only; a running maximum over the variants measured before)
        "xla_peak_mib": m["xla_peak_mib"],
        **runkit.device_peak_memory(),
    }


BREAKDOWN = {
    "no_adam": "Adam update (minus a plain SGD pass)",
    "no_layer_norm": "LayerNorm",
    "relu": "swish (minus relu)",
    "dot_energy": "L2 energy [B,B,D] (minus a [B,B] matmul)",
}


def breakdown_line(lines: list[dict], dims: C.Dims, bench: argparse.Namespace, peak: dict) -> Optional[dict]:
    """Where the default build's SGD step spends its time, by subtraction: each profiling variant
    removes one part; the dense layers' share is their FLOPs at the 256-wide chain's measured rate.
    All in CPU seconds of this process (run it pinned to one core)."""
    by = {line["variant"]: line for line in lines}
    if "scan" not in by or not BREAKDOWN.keys() & by.keys():
        return None
    rate = "sgd_steps_per_cpu_s"  # robust to other processes sharing the core
    step_ms = 1e3 / by["scan"][rate]
    depth = by["scan"]["depth"]
    matmul_ms = (
        1e3
        * sgd_flops(depth, bench.width, bench.batch_size, dims, C.Args().repr_dim)
        / (1e9 * peak["gflops_chain_256_per_cpu_s"])
    )
    out = {"kind": "breakdown", "depth": depth, "step_cpu_ms": round(step_ms, 1)}
    out["dense layers at chain peak ms (share)"] = f"{matmul_ms:.1f} ({matmul_ms / step_ms:.0%})"
    rest = step_ms - matmul_ms
    for variant, name in BREAKDOWN.items():
        if variant in by:
            ms = step_ms - 1e3 / by[variant][rate]
            rest -= ms
            out[f"{name} ms (share)"] = f"{ms:.1f} ({ms / step_ms:.0%})"
    out["the rest ms (share)"] = f"{rest:.1f} ({rest / step_ms:.0%})"
    return out


def energy_check(bench: argparse.Namespace, repr_dim: int = 64, rounds: int = 5) -> list[dict]:
    """The L2 energy matrix + forward InfoNCE, value and gradient three ways (--energy-check)."""
    from jax.experimental import enable_x64

    jnp = jax.numpy

    def loss(logits):
        return C.contrastive_loss(logits, "fwd_infonce", 0.1)

    def expanded(x, y):
        sq = jnp.sum(x**2, 1)[:, None] + jnp.sum(y**2, 1)[None, :] - 2 * jnp.matmul(x, y.T, precision="highest")
        return -jnp.sqrt(jnp.maximum(sq, 0.0) + C.SQRT_EPS)

    ways = {
        "autodiff_differences": lambda x, y: loss(C.energy_rowwise(x[:, None, :], y[None, :, :], "l2")),
        "pairwise_sq_dist": lambda x, y: loss(C.energy(x, y, "l2")),
        "expanded_matmul": lambda x, y: loss(expanded(x, y)),
    }
    b = bench.batch_size
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    base = 3 * jax.random.normal(k1, (1, repr_dim))
    lines = []
    for spread in (1.0, 1e-3):  # 1e-3: every representation alike, as at init
        x, y = (
            base + spread * jax.random.normal(k2, (b, repr_dim)),
            base + spread * jax.random.normal(k3, (b, repr_dim)),
        )
        with enable_x64():
            x64, y64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (x, y))
            truth = jax.value_and_grad(ways["autodiff_differences"], (0, 1))(x64, y64)
            truth = jax.tree_util.tree_map(np.asarray, truth)
        fns = {name: jax.jit(jax.value_and_grad(f, (0, 1))) for name, f in ways.items()}
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, f in fns.items():
                start = time.process_time()  # CPU seconds: robust to other processes on a shared core
                for _ in range(10):
                    out = f(x, y)
                jax.block_until_ready(out)
                times[name].append((time.process_time() - start) / 10)
        for name, f in fns.items():
            value, grads = f(x, y)
            err = max(
                float(np.max(np.abs(np.asarray(g, np.float64) - t)) / np.max(np.abs(t)))
                for g, t in zip(grads, truth[1])
            )
            lines.append(
                {
                    "kind": "energy",
                    "way": name,
                    "representations": "all alike (spread 1e-3)" if spread < 1 else "random",
                    "batch": b,
                    "fwd_bwd_cpu_ms": round(1e3 * float(np.median(times[name])), 2),
                    "loss_error": f"{abs(float(value) - float(truth[0])):.1e}",
                    "gradient_relative_error": f"{err:.1e}",
                }
            )
    return lines


def sgd_memory(
    depth: int, batch_size: int, remat: bool, bench: argparse.Namespace, dims: C.Dims, precision: str
) -> dict:
    """XLA's memory analysis of the jitted SGD step (train state donated, as in crl_deep's epoch)."""
    args = C.Args(depth=depth, width=bench.width, batch_size=batch_size, remat=remat, matmul_precision=precision)
    nets = C.build_networks(args, 0, 0, dims.action_size)
    optimizers = C.make_optimizers(args)
    key = jax.random.PRNGKey(0)
    state = jax.eval_shape(lambda k: C.init_train_state(k, nets, optimizers, args, dims), key)
    f32 = jax.numpy.float32
    batch = {
        "state": jax.ShapeDtypeStruct((batch_size, dims.state_dim), f32),
        "action": jax.ShapeDtypeStruct((batch_size, dims.action_size), f32),
        "goal": jax.ShapeDtypeStruct((batch_size, len(dims.goal_indices)), f32),
    }
    step = jax.jit(lambda s, bt, k: C.sgd_step(s, bt, k, nets, optimizers, args), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    mib = 2**20
    return {
        "kind": "memory",
        "depth": depth,
        "batch": batch_size,
        "remat": remat,
        "precision": precision,
        "params": runkit.tree_size(state["params"]),
        "compile_s": round(compile_s, 1),
        "argument_mib": round(memory.argument_size_in_bytes / mib, 1),
        "output_mib": round(memory.output_size_in_bytes / mib, 1),
        "alias_mib": round(memory.alias_size_in_bytes / mib, 1),
        "temp_mib": round(memory.temp_size_in_bytes / mib, 1),
        "peak_estimate_mib": round(xla_peak_bytes(memory) / mib, 1),
    }


def measure_loop(variant: str, depth: int, bench: argparse.Namespace, env, stepper, dims: C.Dims) -> dict:
    """crl_deep.train_epoch on reacher: one train step = 32 envs x 10 steps, then 8 SGD steps."""
    unroll, sgd_per_step = 10, max(1, bench.num_envs * 10 // 40)
    args = C.Args(
        env="reacher",
        depth=depth,
        width=bench.width,
        batch_size=bench.batch_size,
        num_envs=bench.num_envs,
        unroll_length=unroll,
        sgd_steps_per_train_step=sgd_per_step,
        replay_size=1000,
        min_replay_size=max(2 * unroll, -(-bench.batch_size // bench.num_envs)),
        episode_length=1000,
        remat=variant == "remat",
        scan_unroll=scan_unroll(variant, depth),
        matmul_precision=matmul_precision(variant),
    )
    nets = C.build_networks(args, 0, 0, dims.action_size)
    key = jax.random.PRNGKey(0)
    optimizers = C.make_optimizers(args)
    carry = jax.jit(
        lambda k: {
            "train_state": C.init_train_state(k, nets, optimizers, args, dims),
            "buffer": C.buffer_init(args.replay_size, args.num_envs, dims.state_dim, dims.action_size),
            "env_state": env.reset(jax.random.split(k, args.num_envs)),
            "key": k,
        }
    )(key)
    carry = jax.jit(lambda c: C.prefill(c, stepper, nets, args, dims, runkit.prefill_unrolls(args)), donate_argnums=0)(
        carry
    )
    t = time.perf_counter()
    epoch = jax.jit(lambda c: C.train_epoch(c, stepper, nets, optimizers, args, dims, 1), donate_argnums=0)
    compiled = epoch.lower(carry).compile()
    compile_s = time.perf_counter() - t
    (carry, _), _ = timed(compiled, carry)  # warm
    (carry, metrics), t = timed(compiled, carry)
    memory = compiled.memory_analysis()
    peak = None if memory is None else xla_peak_bytes(memory)
    return {
        "kind": "whole_loop",
        "variant": variant,
        "depth": depth,
        "num_envs": args.num_envs,
        "unroll": unroll,
        "sgd_steps_per_unroll": sgd_per_step,
        "epoch_compile_s": round(compile_s, 2),
        "env_steps_per_s": round(args.num_envs * unroll / t, 2),
        "xla_peak_bytes_estimate": peak,
    }


if __name__ == "__main__":
    bench = parse_bench_args()
    jax.config.update("jax_enable_compilation_cache", False)  # compile times, not cache loads
    state_dim, goal_indices, action_size = SIZES[bench.sizes]
    dims = C.Dims(state_dim, goal_indices, action_size)
    print(json.dumps(environment_line()), flush=True)
    if bench.energy_check:
        for line in energy_check(bench):
            print(json.dumps(line), flush=True)
        sys.exit(0)
    for depth in bench.memory_depths:
        for batch_size in bench.memory_batches:
            for remat in (False, True):
                for precision in bench.memory_precisions:
                    print(json.dumps(sgd_memory(depth, batch_size, remat, bench, dims, precision)), flush=True)
    if bench.memory_depths:
        sys.exit(0)
    if bench.whole_loop:  # the only part that steps an env
        import envs

        raw = envs.make("reacher")
        assert (
            bench.sizes == "reacher" and (raw.state_dim, tuple(raw.goal_indices), raw.action_size) == SIZES["reacher"]
        )
        env = envs.wrap_for_training(raw, episode_length=1000)
        stepper = jax.jit(env.step)
    peak_line = matmul_peak()
    print(json.dumps(peak_line), flush=True)
    for depth in bench.depths:
        variants = [v for v in bench.variants if not (v == "loop" and depth > bench.loop_max_depth)]
        measured = [prepare_sgd(v, depth, bench, dims) for v in variants]
        for _ in range(bench.rounds):
            for m in measured:
                time_round(m)
        lines = [sgd_line(m, bench, dims, peak_line) for m in measured]
        for line in lines:
            print(json.dumps(line), flush=True)
        if breakdown := breakdown_line(lines, dims, bench, peak_line):
            print(json.dumps(breakdown), flush=True)
        del measured
        if bench.whole_loop:
            for variant in variants:
                if variant not in ("loop", "save_all", *BREAKDOWN):
                    print(json.dumps(measure_loop(variant, depth, bench, env, stepper, dims)), flush=True)
