"""State-action representations along a successful rollout (paper Fig. 10).

    python -m tools.representation runs/<depth4 run> runs/<depth64 run> --out figures/representation.png
    python -m tools.representation runs/<--num-seeds run> --run-seed 1   # -> figures/representation_s1.png

For each run: roll out the deterministic policy in the run's evaluation env (`--num-envs` episodes),
keep the episode that spent the most steps at the goal, and embed every step with the critic's
phi(s_t, a_t). Top row: a 2-D PCA projection of the embeddings (colour = time step; steps at the
goal ringed in red) with psi(g) projected as a star. Bottom row: distance to the goal and the
critic value f(s_t, a_t, g) over the episode. The paper's observation: a shallow critic packs the
states near the goal tightly together, a deep one spreads them out; `near_goal_spread` (mean
pairwise distance of phi over the at-goal steps, divided by that over all steps) measures it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too

import argparse
import json

import numpy as np

from tools.agent import RUN_SEED_HELP, Agent, best_episode, load_agents, rollout, seed_out_path
from tools.runs import save_figure


def pca_2d(x: np.ndarray, extra: np.ndarray | None = None):
    """Projects rows of x (and of `extra`) on the top-2 principal axes of x. Returns (px, pextra, ratio)."""
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    axes = vt[:2].T
    if axes.shape[1] < 2:  # a single row or rank-1 data: pad with a zero axis
        axes = np.pad(axes, ((0, 0), (0, 2 - axes.shape[1])))
    var = s**2
    ratio = var[:2].sum() / var.sum() if var.sum() > 0 else 1.0
    return (x - mean) @ axes, None if extra is None else (extra - mean) @ axes, float(ratio)


def mean_pairwise_distance(x: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return float(d.sum() / (len(x) * (len(x) - 1)))


def episode_embeddings(agent: Agent, env, steps: int, num_envs: int, seed: int) -> dict:
    """Rolls out, picks the best episode, and embeds its alive steps."""
    import jax
    import jax.numpy as jnp

    traj = rollout(env, agent, jax.random.PRNGKey(seed), num_envs, steps)
    i = best_episode(traj)
    alive = traj["alive"][:-1, i]  # steps with an action taken in a live state
    states = traj["obs"][:-1, i, : env.state_dim][alive]
    actions = traj["actions"][:, i][alive]
    goal = traj["obs"][0, i, env.state_dim :]

    @jax.jit
    def embed(params, states, actions, goal):
        a = agent.with_params(params)
        phi, psi = a.phi(states, actions), a.psi(goal[None])
        return phi, psi[0], agent.module.energy_rowwise(phi, jnp.broadcast_to(psi, phi.shape), agent.args.energy)

    phi, psi, value = (
        np.asarray(x) for x in embed(agent.params, jnp.asarray(states), jnp.asarray(actions), jnp.asarray(goal))
    )
    return {
        "phi": phi,
        "psi": psi,
        "value": value,
        "dist": traj["dist"][:-1, i][alive],
        "success": traj["success"][:-1, i][alive] > 0.5,
        "episode": i,
    }


def plot_representations(paths, out, env_id=None, steps=1000, num_envs=8, seed=0, run_seeds=None) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import envs

    agents = load_agents(paths, run_seeds)
    fig, axes = plt.subplots(
        2, len(agents), figsize=(5.2 * len(agents), 8.0), squeeze=False, gridspec_kw={"height_ratios": [3, 2]}
    )
    stats = []
    for col, agent in enumerate(agents):
        eid = env_id or envs.eval_variant(agent.args.env)
        env = envs.make(eid)
        e = episode_embeddings(agent, env, steps, num_envs, seed)
        proj, goal_proj, ratio = pca_2d(e["phi"], e["psi"][None])
        t = np.arange(len(proj))
        ax = axes[0, col]
        ax.plot(proj[:, 0], proj[:, 1], color="0.7", lw=0.8, zorder=1)
        sc = ax.scatter(proj[:, 0], proj[:, 1], c=t, cmap="viridis", s=14, zorder=2)
        if e["success"].any():
            ax.scatter(
                proj[e["success"], 0],
                proj[e["success"], 1],
                s=40,
                facecolors="none",
                edgecolors="red",
                lw=0.8,
                zorder=3,
            )
        ax.scatter(goal_proj[:, 0], goal_proj[:, 1], marker="*", s=300, c="red", edgecolors="white", zorder=4)
        ax.set_title(
            f"{eid}: {agent.label}\nphi(s,a) along episode {e['episode']}, PCA 2-D "
            f"({100 * ratio:.0f}% of variance)\nred star: psi(goal); red rings: steps at the goal "
            f"({int(e['success'].sum())})",
            fontsize=9,
        )
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        fig.colorbar(sc, ax=ax, label="time step")
        ax = axes[1, col]
        ax.plot(t, e["dist"], color="tab:blue", label="distance to goal")
        ax.axhline(env.goal_reach_thresh, color="tab:blue", ls=":", lw=1, label="success radius")
        ax.set_xlabel("time step")
        ax.set_ylabel("distance", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(t, e["value"], color="tab:orange", label="critic f(s,a,g)")
        ax2.set_ylabel(f"critic f(s,a,g) [{agent.args.energy}]", color="tab:orange")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
        spread_goal = mean_pairwise_distance(e["phi"][e["success"]])
        spread_all = mean_pairwise_distance(e["phi"])
        stats.append(
            {
                **agent.run_info,
                "env": eid,
                "episode": e["episode"],
                "steps": int(len(t)),
                "steps_at_goal": int(e["success"].sum()),
                # None (JSON null) when fewer than two steps reached the goal
                "near_goal_spread": spread_goal / spread_all if spread_all > 0 and np.isfinite(spread_goal) else None,
            }
        )
    fig.suptitle("State-action representations along the most successful episode", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="crl_deep run folders")
    parser.add_argument(
        "--out", default=None, help="default: figures/representation.png (_s<seed> added with --run-seed)"
    )
    parser.add_argument("--env", default=None, help="env id to roll out in; default: each run's eval env")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--num-envs", type=int, default=8, help="episodes to pick the most successful from")
    parser.add_argument("--seed", type=int, default=0, help="rollout key PRNGKey(SEED)")
    parser.add_argument("--run-seed", type=int, nargs="+", default=None, help=RUN_SEED_HELP)
    args = parser.parse_args(argv)
    args.out = args.out or seed_out_path("figures/representation.png", args.run_seed)
    try:
        if args.steps < 2 or args.num_envs < 1:
            raise ValueError("--steps must be >= 2 and --num-envs >= 1")
        stats = plot_representations(args.runs, args.out, args.env, args.steps, args.num_envs, args.seed, args.run_seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in stats:
        print(json.dumps(s))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
