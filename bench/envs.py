"""Env steps/s for every env id: one JSON line per env.

    python bench/envs.py --num-envs 128 --steps 200
    python bench/envs.py --env-ids ant humanoid --training-wrapper   # with auto-reset + traj ids
    python bench/envs.py --env-ids arm_push_easy --cpu-cores 1         # one core, as below

Reference point for the arm tasks (the paper's code is not part of this repo): on one core of a
2-core AMD EPYC, 128 envs, the paper's own arm_push_easy ran 232 env steps/s. Its physics is the
same MJX model as envs/arm.py, so compare on one machine and one core (`--cpu-cores 1`).

Random actions in [-1, 1], a jitted lax.scan over vmapped steps; the clock starts after a warm-up
call, so compile time is reported separately (`compile_s`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import tyro  # noqa: E402

import envs  # noqa: E402


@dataclasses.dataclass
class Args:
    env_ids: tuple[str, ...] = ()
    """Ids to measure (default: every id in envs.ENV_IDS)."""
    num_envs: int = 128
    """Parallel envs per step (vmapped)."""
    steps: int = 200
    """Steps per env inside the timed scan."""
    repeats: int = 2
    """Timed calls; the best is reported."""
    training_wrapper: bool = False
    """Step through envs.wrap_for_training (episode limit, fresh resets, traj ids)."""
    episode_length: int = 1000
    """Episode length for --training-wrapper."""
    cpu_cores: int = 0
    """Pin the process to this many CPU cores before JAX starts (0: all it may use)."""


def measure(env_id: str, args: Args) -> dict:
    env = envs.make(env_id)
    if args.training_wrapper:
        env = envs.wrap_for_training(env, episode_length=args.episode_length)
        reset = jax.jit(env.reset)
        step = env.step
    else:
        reset = jax.jit(jax.vmap(env.reset))
        step = jax.vmap(env.step)

    @jax.jit
    def rollout(state, key):
        def body(carry, k):
            s = carry
            a = jax.random.uniform(k, (args.num_envs, env.action_size), minval=-1.0, maxval=1.0)
            return step(s, a), None

        state, _ = jax.lax.scan(body, state, jax.random.split(key, args.steps))
        return state

    t0 = time.perf_counter()
    state = reset(jax.random.split(jax.random.PRNGKey(0), args.num_envs))
    state = rollout(state, jax.random.PRNGKey(1))
    jax.block_until_ready(state.obs)
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for r in range(args.repeats):
        t0 = time.perf_counter()
        state = rollout(state, jax.random.PRNGKey(2 + r))
        jax.block_until_ready(state.obs)
        best = min(best, time.perf_counter() - t0)
    finite = bool(jax.numpy.isfinite(state.obs).all())
    return {
        "bench": "envs",
        "env": env_id,
        "backend": env.backend if not args.training_wrapper else env.env.backend,
        "num_envs": args.num_envs,
        "steps_per_env": args.steps,
        "training_wrapper": args.training_wrapper,
        "env_steps_per_s": round(args.num_envs * args.steps / best, 1),
        "compile_s": round(compile_s, 2),
        "finite": finite,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "cpus_used": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _pin_and_restart(cores: int) -> None:
    """Restricts the process to `cores` CPUs and re-executes it: XLA sizes its thread pools when
    the backend starts, which importing brax may already have done."""
    available = sorted(os.sched_getaffinity(0))
    if cores > len(available):
        raise SystemExit(f"error: --cpu-cores {cores} but only {len(available)} cores are available")
    os.sched_setaffinity(0, available[:cores])
    os.environ["BENCH_ENVS_PINNED"] = "1"
    os.execv(sys.executable, [sys.executable, *sys.argv])


def main(args: Args) -> None:
    ids = args.env_ids or envs.ENV_IDS
    for env_id in ids:
        if env_id not in envs.ENV_IDS:
            raise SystemExit(f"error: unknown env id {env_id!r}; valid ids: {', '.join(envs.ENV_IDS)}")
    if args.cpu_cores < 0:
        raise SystemExit(f"error: --cpu-cores must be >= 0, got {args.cpu_cores}")
    if args.cpu_cores and os.environ.get("BENCH_ENVS_PINNED") != "1":
        _pin_and_restart(args.cpu_cores)
    for env_id in ids:
        print(json.dumps(measure(env_id, args)), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
