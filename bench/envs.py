"""Env steps/s for every env id: one JSON line per env.

    python bench/envs.py --num-envs 128 --steps 200
    python bench/envs.py --env-ids ant humanoid --training-wrapper   # with auto-reset + traj ids
    python bench/envs.py --env-ids arm_push_easy --cpu-cores 1         # one core, as below
    python bench/envs.py --env-ids arm_push_easy --compare-brax-step   # ours vs brax's pipeline_step
    python bench/envs.py --env-ids arm_push_easy --breakdown           # ms per MJX substep stage

Reference point for the arm tasks (the paper's code is not part of this repo): on one core of a
2-core AMD EPYC, 128 envs, the paper's own arm_push_easy ran 232 env steps/s. Its physics is the
same MJX model as envs/arm.py, so compare on one machine and one core (`--cpu-cores 1`). Ours, on
one quiet core of that machine (`taskset -c 1`, load average 1.1): 495 steps/s (2.1x); brax's
pipeline_step on the same model, which the paper's code steps through, 436 in the same process
(`--compare-brax-step`: ours 1.13x, identical observations). Under load, wall-clock rates fall far
below these; `--compare-brax-step` also reports steps per CPU-second. docs/envs.md, "Throughput".

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
    compare_brax_step: bool = False
    """Arm ids only: time our step against the same env stepped through brax's
    PipelineEnv.pipeline_step (the path before the speed-up), interleaved in this process, and
    report both, their ratio and the largest observation difference."""
    breakdown: bool = False
    """Arm ids only: time each stage of one MJX substep (vmapped over --num-envs, from a state 30
    random steps in) and count the Newton and line-search iterations the batch runs."""


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


def compare_brax_step(env_id: str, args: Args) -> dict:
    """Ours vs brax's pipeline_step on the same env, same starts and actions, timed alternately."""
    from brax.envs.base import PipelineEnv

    ours = envs.make(env_id)
    theirs = envs.make(env_id)
    theirs.pipeline_step = lambda pipeline_state, action: PipelineEnv.pipeline_step(theirs, pipeline_state, action)

    def rollout_fn(env):
        @jax.jit
        def rollout(state, key):
            def body(s, k):
                a = jax.random.uniform(k, (args.num_envs, env.action_size), minval=-1.0, maxval=1.0)
                s = jax.vmap(env.step)(s, a)
                return s, s.obs

            return jax.lax.scan(body, state, jax.random.split(key, args.steps))

        return rollout

    start = jax.jit(jax.vmap(ours.reset))(jax.random.split(jax.random.PRNGKey(0), args.num_envs))
    rollouts = {"ours": rollout_fn(ours), "brax_pipeline_step": rollout_fn(theirs)}
    obs = {name: f(start, jax.random.PRNGKey(1))[1] for name, f in rollouts.items()}  # compiles
    diff = jax.numpy.abs(obs["ours"] - obs["brax_pipeline_step"]).max(axis=(1, 2))
    rates = {name: [] for name in rollouts}
    cpu_rates = {name: [] for name in rollouts}
    for r in range(args.repeats):
        for name, f in rollouts.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(start, jax.random.PRNGKey(2 + r)))
            rates[name].append(args.num_envs * args.steps / (time.perf_counter() - t0))
            cpu_rates[name].append(args.num_envs * args.steps / (time.process_time() - c0))
    best = {name: max(v) for name, v in rates.items()}
    best_cpu = {name: max(v) for name, v in cpu_rates.items()}
    return {
        "bench": "envs_compare_brax_step",
        "env": env_id,
        "num_envs": args.num_envs,
        "steps_per_env": args.steps,
        "env_steps_per_s": {name: round(v, 1) for name, v in best.items()},
        "each_repeat": {name: [round(x, 1) for x in v] for name, v in rates.items()},
        "ratio_best": round(best["ours"] / best["brax_pipeline_step"], 2),
        # per second of this process's CPU time: steadier than wall time while others share the core
        "env_steps_per_cpu_s": {name: round(v, 1) for name, v in best_cpu.items()},
        "ratio_best_cpu": round(best_cpu["ours"] / best_cpu["brax_pipeline_step"], 2),
        "max_obs_diff_per_step": [float(x) for x in diff],
        "cpus_used": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
    }


def breakdown(env_id: str, args: Args) -> list[dict]:
    """Milliseconds per stage of one MJX substep for a batch of --num-envs, as MJX 3.2.6 splits
    mjx.step (mujoco/mjx/_src/forward.py); each stage runs on its own input, 10 times in a loop."""
    from mujoco import mjx
    from mujoco.mjx._src import collision_driver, constraint, sensor, smooth, solver
    from mujoco.mjx._src import forward as mjx_forward

    from envs import arm

    env = envs.make(env_id)
    m = env.sys
    state = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(0), args.num_envs))
    step = jax.jit(jax.vmap(env.step))
    for i in range(30):
        state = step(state, jax.random.uniform(jax.random.PRNGKey(100 + i), (args.num_envs, 5), minval=-1.0))
    ps = state.pipeline_state
    make = lambda q, v, c, w: mjx.make_data(m).replace(qpos=q, qvel=v, ctrl=c, qacc_warmstart=w)
    data = jax.jit(jax.vmap(make))(ps.qpos, ps.qvel, ps.ctrl, ps.qacc_warmstart)

    def smooth_part(m, d):
        for f in (smooth.kinematics, smooth.com_pos, smooth.camlight, smooth.tendon, smooth.crb, smooth.factor_m):
            d = f(m, d)
        return d

    def to_solver(m, d):
        d = constraint.make_constraint(m, collision_driver.collision(m, smooth_part(m, d)))
        d = sensor.sensor_pos(m, smooth.transmission(m, d))
        d = mjx_forward.fwd_velocity(m, d)
        return mjx_forward.fwd_acceleration(m, mjx_forward.fwd_actuation(m, d))

    run = lambda f, d: jax.jit(jax.vmap(lambda x: f(m, x)))(d)
    d_smooth = run(smooth_part, data)
    d_collided = run(collision_driver.collision, d_smooth)
    d_constrained = run(lambda m, d: constraint.make_constraint(m, smooth.transmission(m, d)), d_collided)
    d_solver_in = run(to_solver, data)
    d_solved = run(solver.solve, d_solver_in)
    groups = collision_driver._contact_groups(m, jax.tree_util.tree_map(lambda x: x[0], d_smooth))
    stages = [
        ("kinematics, com, crb, factor_m", smooth_part, data),
        ("collision, all pairs", collision_driver.collision, d_smooth),
    ]
    for key, contact in groups.items():
        fn = collision_driver._COLLISION_FUNC[key.types]
        types = "-".join(mujoco_type_name(t) for t in key.types)
        stages.append(
            (
                f"  collision {types} x{contact.geom.shape[0]} pairs",
                lambda m, d, fn=fn, key=key, g=contact.geom: fn(m, d, key, g),
                d_smooth,
            )
        )
    stages += [
        (
            "make_constraint, transmission",
            lambda m, d: constraint.make_constraint(m, smooth.transmission(m, d)),
            d_collided,
        ),
        ("fwd_velocity (com_vel, passive, rne)", mjx_forward.fwd_velocity, d_constrained),
        (
            "fwd_actuation, fwd_acceleration",
            lambda m, d: mjx_forward.fwd_acceleration(m, mjx_forward.fwd_actuation(m, d)),
            d_constrained,
        ),
        ("solver.solve (Newton), MJX's line-search scan", solver.solve, d_solver_in),
        ("solver.solve (Newton), line search as while loop", "while", d_solver_in),
        ("implicitfast integration", mjx_forward.implicit, d_solved),
        ("mjx.step, whole substep (MJX's scan)", mjx.step, data),
    ]
    lines = []
    for name, fn, d in stages:
        if fn == "while":
            with arm._line_search_as_while_loop():
                ms = _stage_ms(lambda x: solver.solve(m, x), d)
        else:
            ms = _stage_ms(lambda x, fn=fn: fn(m, x), d)
        lines.append(
            {
                "bench": "arm_substep_breakdown",
                "env": env_id,
                "num_envs": args.num_envs,
                "stage": name,
                "ms": round(ms, 3),
            }
        )
    lines.append({"bench": "arm_substep_breakdown", "env": env_id, **_solver_iterations(m, d_solver_in)})
    return lines


def mujoco_type_name(geom_type) -> str:
    import mujoco

    return mujoco.mjtGeom(int(geom_type)).name.removeprefix("mjGEOM_").lower()


def _stage_ms(fn, data, reps: int = 10) -> float:
    """Best of 3 timed calls of a jitted loop running the vmapped `fn` `reps` times on `data`; the
    input passes an optimization barrier with the loop counter so XLA cannot hoist the work out of
    the loop, and every float output is kept alive."""
    import jax.numpy as jnp

    def once(c):
        d = jax.lax.optimization_barrier((data, c))[0]
        out = jax.vmap(fn)(d)
        leaves = [x for x in jax.tree_util.tree_leaves(out) if jnp.issubdtype(x.dtype, jnp.floating) and x.size]
        leaves = jax.lax.optimization_barrier(leaves)
        return c + 0 * sum(x.ravel()[0] for x in leaves)

    loop = jax.jit(lambda: jax.lax.fori_loop(0, reps, lambda i, c: once(c), jnp.float32(0)))
    loop().block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        loop().block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / reps


def _solver_iterations(m, data) -> dict:
    """Newton iterations each env needs (MJX stops an env's solve at its tolerance or after 6) and
    line-search iterations per search, for the batch `data`, with our line-search stand-ins
    (envs/arm.py) that run exactly the iterations MJX's scan does not skip. `all envs`: every
    search the vmapped batch computes under MJX's own loop, including those of envs whose solve
    has stopped (discarded); `unconverged`: only the searches whose result is used."""
    import numpy as np
    from mujoco.mjx._src import solver

    from envs import arm

    newton, searches = [], []
    original_while_loop = jax.lax.while_loop

    def counting_while_loop(cond, body, init):
        out = original_while_loop(cond, body, init)
        if hasattr(out, "solver_niter"):
            newton.append(out.solver_niter)
        return out

    def counting_line_search(cond_fun, body_fun, init_val, max_iter):
        unconverged = arm._SOLVER_UNCONVERGED[-1]
        n_all = original_while_loop(
            lambda c: cond_fun(c[0]) & (c[1] < max_iter), lambda c: (body_fun(c[0]), c[1] + 1), (init_val, 0)
        )[1]
        out, n = original_while_loop(
            lambda c: cond_fun(c[0]) & (c[1] < max_iter) & unconverged,
            lambda c: (body_fun(c[0]), c[1] + 1),
            (init_val, 0),
        )
        record = lambda n_all, n, u: searches.append((np.ravel(n_all), np.ravel(n), np.ravel(u)))
        jax.debug.callback(record, n_all, n, unconverged)
        return out

    def solve(d):
        newton.clear()
        with arm._line_search_as_while_loop():
            solver._while_loop_scan = counting_line_search
            jax.lax.while_loop = counting_while_loop
            try:
                out = solver.solve(m, d)
            finally:
                jax.lax.while_loop = original_while_loop
        return out.qacc, newton[0]

    _, niter = jax.jit(jax.vmap(solve))(data)
    jax.effects_barrier()
    niter = np.asarray(niter)
    n_all, n, unconverged = (np.concatenate(x) for x in zip(*searches))
    used = n[unconverged.astype(bool)]
    hist = lambda x: np.bincount(x, minlength=13).tolist()
    return {
        "newton_iterations_per_env": {
            "mean": round(float(niter.mean()), 2),
            "max (the batch runs this many)": int(niter.max()),
            "histogram_0_to_6": np.bincount(niter, minlength=7).tolist(),
        },
        "line_search_iterations_all_envs": {"mean": round(float(n_all.mean()), 2), "histogram_0_to_12": hist(n_all)},
        "line_search_iterations_unconverged": {"mean": round(float(used.mean()), 2), "histogram_0_to_12": hist(used)},
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
        if (args.compare_brax_step or args.breakdown) and not env_id.startswith("arm_"):
            raise SystemExit(f"error: --compare-brax-step and --breakdown are for arm ids, got {env_id!r}")
        if args.compare_brax_step:
            print(json.dumps(compare_brax_step(env_id, args)), flush=True)
        elif args.breakdown:
            for line in breakdown(env_id, args):
                print(json.dumps(line), flush=True)
        else:
            print(json.dumps(measure(env_id, args)), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
