"""Collector / learner experiment (paper Fig. 8): does depth help through exploration or capacity?

    python -m tools.collector_learner --collector-depth 32 --learner-depths 4 32 --env ant_big_maze
    python -m tools.collector_learner --plot runs/cl_d32_* runs/cl_d4_* --out figures/collector_learner.png

One collector agent (CRL at `--collector-depth`) acts in the env and trains as in crl_deep.py.
Learners of other depths never act: after every unroll they take the same number of SGD steps on
the very same batches from the collector's buffer. So the learners share the collector's data
distribution and differ only in capacity. Every epoch each agent's deterministic actor is
evaluated like crl_deep's. Every other flag is crl_deep.py's (`--env`, `--num-envs`,
`--total-env-steps`, ...; `--depth` is ignored), so the two scripts run the same algorithm.

Outputs in `<run-dir>/<run-name>/`: config.json, metrics.jsonl (`eval/<agent>/<metric>` and
`training/<agent>/<metric>` with agents `collector_d<D>` and `learner_d<D>`), summary.json and
collector_learner.png (success over env steps, one line per agent).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too

import argparse
import dataclasses
import json
import time

import runkit
from tools.runs import atomic_write, find_runs, save_figure


def agent_names(collector_depth: int, learner_depths: list[int]) -> list[str]:
    return [f"collector_d{collector_depth}"] + [f"learner_d{d}" for d in learner_depths]


def make_epoch_fn(crl, env, collector_nets, learner_nets, collector_args, learner_args, dims, num_train_steps):
    """One epoch: num_train_steps x (collector unroll -> buffer, then sgd_steps_per_train_step SGD
    steps where collector and every learner update on the same sampled batch)."""
    import jax
    import jax.numpy as jnp

    args = collector_args

    def sgd(inner, key):
        states, buffer = inner
        k_sample, k_sgd = jax.random.split(key)
        # the collector uses crl_deep's key; learner i folds its index in: adding learners never
        # changes the collector's random stream
        k_agents = [k_sgd] + [jax.random.fold_in(k_sgd, i) for i in range(1, 1 + len(learner_nets))]
        batch = crl.buffer_sample(buffer, k_sample, args.batch_size, args.discount, dims.goal_indices)
        new_states, metrics = [], []
        for ts, nets, a, k in zip(states, [collector_nets] + learner_nets, [collector_args] + learner_args, k_agents):
            ts, m = crl.sgd_step(ts, batch, k, nets, crl.make_optimizers(a), a)
            new_states.append(ts)
            metrics.append(m)
        return (new_states, buffer), metrics

    def train_step(carry, _):
        key, k_collect, k_sgd = jax.random.split(carry["key"], 3)
        env_state, states, actions, traj_ids = crl.collect_unroll(
            env.step,
            collector_nets.actor,
            carry["agents"][0]["params"]["actor"],
            carry["env_state"],
            k_collect,
            args.unroll_length,
            dims.state_dim,
        )
        buffer = crl.buffer_insert(carry["buffer"], states, actions, traj_ids)
        (agents, buffer), metrics = jax.lax.scan(
            sgd, (carry["agents"], buffer), jax.random.split(k_sgd, args.sgd_steps_per_train_step)
        )
        return {"agents": agents, "buffer": buffer, "env_state": env_state, "key": key}, jax.tree_util.tree_map(
            jnp.mean, metrics
        )

    def epoch(carry):
        carry, metrics = jax.lax.scan(train_step, carry, None, length=num_train_steps)
        return carry, jax.tree_util.tree_map(jnp.mean, metrics)

    return jax.jit(epoch, donate_argnums=0)


def train(collector_depth: int, learner_depths: list[int], crl_argv: list[str]) -> str:
    """Runs the experiment; returns the run folder."""
    import jax
    import numpy as np
    import tyro

    import crl_deep as crl
    import envs

    base = tyro.cli(crl.Args, args=crl_argv, prog="collector_learner.py (crl_deep flags)")
    collector_args = dataclasses.replace(base, depth=collector_depth, actor_depth=None, critic_depth=None)
    learner_args = [dataclasses.replace(base, depth=d, actor_depth=None, critic_depth=None) for d in learner_depths]
    for a in [collector_args] + learner_args:
        crl.check_args(a)
    names = agent_names(collector_depth, learner_depths)
    if len(set(names)) != len(names):
        raise SystemExit("error: learner depths must differ from each other and may not repeat")
    run_name = base.run_name or f"{base.env}__collector_learner__c{collector_depth}__s{base.seed}__{int(time.time())}"
    run_path = os.path.join(base.run_dir, run_name)
    if os.path.exists(os.path.join(run_path, "summary.json")):
        raise SystemExit(f"error: {run_path} already holds a finished run")
    os.makedirs(run_path, exist_ok=True)
    config = {
        "script": "collector_learner",
        "args": {
            **dataclasses.asdict(base),
            "collector_depth": collector_depth,
            "learner_depths": list(learner_depths),
        },
    }
    atomic_write(os.path.join(run_path, "config.json"), json.dumps(config, indent=2))

    raw_env = envs.make(base.env)
    env = envs.wrap_for_training(raw_env, episode_length=base.episode_length, cached_reset=base.cached_reset)
    eval_env = envs.make(base.eval_env or envs.eval_variant(base.env))
    dims = crl.Dims(raw_env.state_dim, tuple(int(i) for i in raw_env.goal_indices), raw_env.action_size)
    build = lambda a: crl.build_networks(a, raw_env.observation_size, len(dims.goal_indices), dims.action_size)  # noqa: E731
    collector_nets, learner_nets = build(collector_args), [build(a) for a in learner_args]
    all_nets = [collector_nets] + learner_nets

    # crl_deep.py's key schedule, so the collector is the run crl_deep.py makes with the same flags
    key, k_init, k_reset, k_eval = jax.random.split(jax.random.PRNGKey(base.seed), 4)
    k_inits = [k_init] + [jax.random.fold_in(k_init, i) for i in range(1, len(all_nets))]
    agents = [
        crl.init_train_state(k, n, crl.make_optimizers(a), a, dims)
        for k, n, a in zip(k_inits, all_nets, [collector_args] + learner_args)
    ]
    carry = {
        "train_state": agents[0],
        "buffer": crl.buffer_init(base.replay_size, base.num_envs, dims.state_dim, dims.action_size),
        "env_state": jax.jit(env.reset)(jax.random.split(k_reset, base.num_envs)),
        "key": key,
    }
    carry = jax.jit(
        lambda c: crl.prefill(c, env.step, collector_nets, collector_args, dims, runkit.prefill_unrolls(base))
    )(carry)
    carry = {"agents": agents, "buffer": carry["buffer"], "env_state": carry["env_state"], "key": carry["key"]}
    num_train_steps = runkit.train_steps_per_epoch(base)
    epoch_fn = make_epoch_fn(
        crl, env, collector_nets, learner_nets, collector_args, learner_args, dims, num_train_steps
    )
    steps_per_epoch = num_train_steps * base.num_envs * base.unroll_length
    env_steps = runkit.prefill_unrolls(base) * base.unroll_length * base.num_envs

    evaluators = [
        jax.jit(
            lambda p, k, n=n: envs.evaluate(
                eval_env,
                lambda obs: crl.deterministic_action(n.actor, p, obs),
                k,
                base.num_eval_envs,
                base.episode_length,
            )
        )
        for n in all_nets
    ]
    metrics_path = os.path.join(run_path, "metrics.jsonl")
    open(metrics_path, "w").close()
    history, start = [], time.time()
    for epoch in range(base.num_epochs):
        t0 = time.time()
        carry, train_metrics = epoch_fn(carry)
        train_metrics = jax.device_get(train_metrics)
        epoch_seconds = time.time() - t0
        env_steps += steps_per_epoch
        record = {
            "epoch": epoch,
            "env_steps": env_steps,
            "wall_time": time.time() - start,
            "sps": steps_per_epoch / epoch_seconds,
        }
        k_epoch = jax.random.fold_in(k_eval, epoch)
        evals = {}
        for name, ts, m, ev in zip(names, carry["agents"], train_metrics, evaluators):
            record.update({f"training/{name}/{k}": float(v) for k, v in m.items()})
            evals.update(
                {f"eval/{name}/{k}": float(v) for k, v in jax.device_get(ev(ts["params"]["actor"], k_epoch)).items()}
            )
        record.update(evals)
        history.append(evals)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            json.dumps(
                {
                    "epoch": epoch,
                    "env_steps": env_steps,
                    **{n: round(evals[f"eval/{n}/episode_success"], 2) for n in names},
                }
            ),
            flush=True,
        )
    last5 = history[-5:]
    summary = {
        "summary": True,
        "epochs": len(history),
        "env_steps": env_steps,
        **{f"{k}_last5": float(np.mean([h[k] for h in last5])) for k in last5[0]},
    }
    with open(metrics_path, "a") as f:
        f.write(json.dumps(summary) + "\n")
    plot([run_path], os.path.join(run_path, "collector_learner.png"))
    atomic_write(os.path.join(run_path, "summary.json"), json.dumps(summary, indent=2))
    return run_path


def plot(paths: list[str], out: str, metric: str = "episode_success") -> None:
    """One panel per collector depth (seeds averaged), one line per agent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import EngFormatter

    runs = [r for r in find_runs(paths) if r.script == "collector_learner"]
    if not runs:
        raise ValueError(f"no collector_learner runs under {paths}")
    panels = {}
    for r in runs:
        panels.setdefault((r.args["env"], r.args["collector_depth"]), []).append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.0), squeeze=False)
    for ax, ((env_id, cdepth), members) in zip(axes[0], sorted(panels.items())):
        names = agent_names(cdepth, members[0].args["learner_depths"])
        for name, style in zip(names, ["-"] + ["--"] * (len(names) - 1)):
            series = [m.series(f"eval/{name}/{metric}") for m in members]
            length = min(len(s[0]) for s in series)
            if length == 0:
                continue
            x = np.mean([s[0][:length] for s in series], 0)
            y = np.array([s[1][:length] for s in series])
            role, depth = name.split("_d")
            label = f"{role}, depth {depth}" + (" (acts, fills the buffer)" if role == "collector" else "")
            (line,) = ax.plot(x, y.mean(0), style, lw=2, marker="o" if length < 15 else None, ms=3, label=label)
            if len(members) > 1:
                ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=line.get_color(), alpha=0.2)
        ax.set_title(f"{env_id}: collector depth {cdepth} ({len(members)} seed{'s' * (len(members) > 1)})")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_xlabel("env steps (collected by the collector)")
        ax.set_ylabel(f"eval/{metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Learners train only on the collector's data: gaps between them come from capacity", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--collector-depth", type=int, default=32)
    parser.add_argument(
        "--learner-depths",
        type=int,
        nargs="+",
        default=[4, 32],
        help="depths of the learners (never act; train on the collector's batches)",
    )
    parser.add_argument(
        "--plot",
        nargs="+",
        default=None,
        metavar="RUN",
        help="only plot these run folders (or folders of them) to --out",
    )
    parser.add_argument("--out", default="figures/collector_learner.png", help="figure path for --plot")
    args, crl_argv = parser.parse_known_args(argv)
    try:
        if args.plot:
            plot(args.plot, args.out)
            print(f"-> {args.out}")
            return 0
        if args.collector_depth <= 0 or args.collector_depth % 4 or any(d <= 0 or d % 4 for d in args.learner_depths):
            raise ValueError("--collector-depth and --learner-depths must be positive multiples of 4")
        run_path = train(args.collector_depth, args.learner_depths, crl_argv)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"-> {run_path} (figure: {os.path.join(run_path, 'collector_learner.png')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
