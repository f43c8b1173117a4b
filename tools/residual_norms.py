"""L2 norm of each residual block's branch output (paper Fig. 17), per network.

    python -m tools.residual_norms runs/<d32 run> runs/<d64 run> runs/<d256 run> --out figures/residual_norms.png
    python -m tools.residual_norms runs/<--num-seeds run> --run-seed 1   # -> figures/residual_norms_s1.png

The batch is every live step of a short rollout of each run's own deterministic policy in its
evaluation env (`--num-envs` x `--steps`): actor inputs concat[s, g], phi inputs concat[s, a],
psi inputs g. Each network is applied with flax's 'intermediates' collection mutable, which makes
crl_deep's residual blocks record the batch-mean L2 norm of the branch (before the skip add).
Panels: actor, phi(s, a), psi(g); one line per run, x = block index (block k holds layers
4k+1..4k+4). The paper reports norms shrinking with block index in deep critics.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too

import argparse
import json

import numpy as np

from tools.agent import RUN_SEED_HELP, Agent, load_agents, rollout, seed_out_path
from tools.runs import save_figure

NETWORKS = (("actor", "actor  pi(a | s, g)"), ("sa_encoder", "critic phi(s, a)"), ("g_encoder", "critic psi(g)"))


def residual_norms(agent: Agent, obs, actions, state_dim: int) -> dict:
    """{network name: np.array [num_blocks]} of batch-mean residual-branch norms."""
    import jax
    import jax.numpy as jnp

    obs = jnp.asarray(obs)
    inputs = {
        "actor": obs,
        "sa_encoder": jnp.concatenate([obs[:, :state_dim], jnp.asarray(actions)], -1),
        "g_encoder": obs[:, state_dim:],
    }
    out = {}
    for name, _ in NETWORKS:
        net = getattr(agent.nets, name)
        apply = jax.jit(lambda p, x, net=net: net.apply(p, x, mutable=["intermediates"])[1])
        (norms,) = apply(agent.params[name], inputs[name])["intermediates"]["tower"]["blocks"]["residual_norm"]
        out[name] = np.asarray(norms)
    return out


def batch_from_rollout(agent: Agent, env, steps: int, num_envs: int, seed: int):
    import jax

    traj = rollout(env, agent, jax.random.PRNGKey(seed), num_envs, steps)
    alive = traj["alive"][:-1]
    return traj["obs"][:-1][alive], traj["actions"][alive]


def plot_residual_norms(
    paths, out, env_id=None, steps=100, num_envs=8, seed=0, log_y=False, run_seeds=None
) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    import envs

    agents = load_agents(paths, run_seeds)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    results = []
    for k, agent in enumerate(agents):
        env = envs.make(env_id or envs.eval_variant(agent.args.env))
        obs, actions = batch_from_rollout(agent, env, steps, num_envs, seed)
        norms = residual_norms(agent, obs, actions, env.state_dim)
        color = cmap(0.9 * k / max(1, len(agents) - 1))
        for ax, (name, _) in zip(axes[0], NETWORKS):
            blocks = np.arange(1, len(norms[name]) + 1)
            ax.plot(
                blocks, norms[name], marker="o" if len(blocks) <= 32 else None, ms=3, color=color, label=agent.label
            )
        results.append(
            {
                **agent.run_info,
                "batch": int(len(obs)),
                **{name: [round(float(v), 5) for v in norms[name]] for name, _ in NETWORKS},
            }
        )
    for ax, (_, title) in zip(axes[0], NETWORKS):
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("residual block (4 Dense layers each)")
        ax.set_ylabel("mean L2 norm of the residual branch")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Residual-branch norms per block on a rollout batch", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="crl_deep run folders")
    parser.add_argument(
        "--out", default=None, help="default: figures/residual_norms.png (_s<seed> added with --run-seed)"
    )
    parser.add_argument("--env", default=None, help="env id of the batch rollout; default: each run's eval env")
    parser.add_argument("--steps", type=int, default=100, help="rollout steps per env for the batch")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-y", action="store_true", help="logarithmic norm axis")
    parser.add_argument("--run-seed", type=int, nargs="+", default=None, help=RUN_SEED_HELP)
    args = parser.parse_args(argv)
    args.out = args.out or seed_out_path("figures/residual_norms.png", args.run_seed)
    try:
        if args.steps < 1 or args.num_envs < 1:
            raise ValueError("--steps and --num-envs must be >= 1")
        results = plot_residual_norms(
            args.runs, args.out, args.env, args.steps, args.num_envs, args.seed, args.log_y, args.run_seed
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
