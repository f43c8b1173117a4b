"""Q-value map over a maze (paper Fig. 9): the critic's value of reaching one goal from every torso
position, with the walls drawn.

    python -m tools.qmap runs/<run> [runs/<run2> ...] --out figures/qmap.png [--goal X Y]
    python -m tools.qmap runs/<--num-seeds run> --run-seed 1        # seed 1's agent -> figures/qmap_s1.png

For each grid point (x, y) the state is a reset state of the run's maze with the torso moved to
(x, y); the action is the policy's deterministic action there; the value is the trained energy
f(s, a, g) = -||phi(s, a) - psi(g)|| (or the run's --energy). Several runs (e.g. depth 4 and 64)
share one row of panels, each with its own colour scale (energies of different nets are not
comparable). The default goal is the `_eval` layout's goal cell farthest from the start along the
corridors (so the wall lies between them).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too

import argparse

import numpy as np

from tools.agent import RUN_SEED_HELP, Agent, load_agents, seed_out_path
from tools.runs import save_figure


def maze_path_distances(rows, start_cell) -> dict:
    """Shortest number of cell moves (4-neighbour, through non-wall cells) from `start_cell`."""
    dist, frontier = {start_cell: 0}, [start_cell]
    while frontier:
        nxt = []
        for i, j in frontier:
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                c = (i + di, j + dj)
                if 0 <= c[0] < len(rows) and 0 <= c[1] < len(rows[0]) and rows[c[0]][c[1]] != "1" and c not in dist:
                    dist[c] = dist[(i, j)] + 1
                    nxt.append(c)
        frontier = nxt
    return dist


def default_goal(env_id: str) -> np.ndarray:
    """The far goal: the eval layout's goal cell with the longest path from the start cell."""
    import envs

    maze = envs.make(envs.eval_variant(env_id)).maze
    to_cell = lambda xy: (int(round(xy[0] / maze.scale)), int(round(xy[1] / maze.scale)))  # noqa: E731
    dist = maze_path_distances(maze.rows, to_cell(maze.starts[0]))
    far = max(range(len(maze.goals)), key=lambda k: dist.get(to_cell(maze.goals[k]), -1))
    return np.asarray(maze.goals[far], np.float32)


def q_grid(agent: Agent, env, goal_xy, points_per_cell: int = 8, key_seed: int = 0):
    """Critic values on a grid of torso positions, `points_per_cell` per maze cell side.

    Returns xs [nx], ys [ny], values [ny, nx] (NaN inside walls) and the maze spec.
    """
    import jax
    import jax.numpy as jnp

    maze = env.maze
    scale = maze.scale
    n_rows, n_cols = len(maze.rows), len(maze.rows[0])
    step = scale / points_per_cell
    xs = np.arange(-0.5 * scale + step / 2, (n_rows - 0.5) * scale, step)
    ys = np.arange(-0.5 * scale + step / 2, (n_cols - 0.5) * scale, step)
    gx, gy = np.meshgrid(xs, ys)  # [ny, nx]
    cell_i = np.clip(np.round(gx / scale).astype(int), 0, n_rows - 1)
    cell_j = np.clip(np.round(gy / scale).astype(int), 0, n_cols - 1)
    in_wall = np.array([[maze.rows[i][j] == "1" for i, j in zip(ri, rj)] for ri, rj in zip(cell_i, cell_j)])

    state = jax.jit(env.reset)(jax.random.PRNGKey(key_seed))
    base = np.array(state.obs[: env.state_dim])
    xy_idx = list(env.goal_indices[:2])  # the torso x, y entries of the state
    goal = np.array(state.obs[env.state_dim :])
    goal[:2] = goal_xy
    states = np.repeat(base[None], gx.size, 0)
    states[:, xy_idx[0]] = gx.ravel()
    states[:, xy_idx[1]] = gy.ravel()
    goals = np.repeat(goal[None], gx.size, 0)

    @jax.jit
    def values(params, states, goals):
        a = agent.with_params(params)
        actions = a.act(jnp.concatenate([states, goals], -1))
        return a.critic(states, actions, goals)

    v = np.array(values(agent.params, jnp.asarray(states), jnp.asarray(goals)), np.float64).reshape(gx.shape)
    v[in_wall] = np.nan
    return xs, ys, v, maze


def plot_qmaps(paths: list[str], out: str, goal=None, run_seeds: list[int] | None = None) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    import envs

    agents = load_agents(paths, run_seeds)
    env_ids = {a.args.env for a in agents}
    if len(env_ids) > 1:
        raise ValueError(f"runs are from different envs {sorted(env_ids)}; one maze per figure")
    env_id = env_ids.pop()
    env = envs.make(env_id)
    if not hasattr(env, "maze"):
        raise ValueError(f"{env_id} is not a maze env; the Q map needs a maze (e.g. ant_u4_maze)")
    goal_xy = np.asarray(goal if goal is not None else default_goal(env_id), np.float32)
    fig, axes = plt.subplots(1, len(agents), figsize=(5.0 * len(agents), 4.6), squeeze=False)
    stats = []
    for ax, agent in zip(axes[0], agents):
        xs, ys, v, maze = q_grid(agent, env, goal_xy)
        half = maze.scale / 2
        extent = (
            xs[0] - (xs[1] - xs[0]) / 2,
            xs[-1] + (xs[1] - xs[0]) / 2,
            ys[0] - (ys[1] - ys[0]) / 2,
            ys[-1] + (ys[1] - ys[0]) / 2,
        )
        im = ax.imshow(v, origin="lower", extent=extent, cmap="viridis", interpolation="nearest")
        for wx, wy in maze.walls:
            ax.add_patch(
                patches.Rectangle(
                    (wx - half, wy - half), maze.scale, maze.scale, facecolor="0.35", edgecolor="0.2", lw=0.5
                )
            )
        start = maze.starts[0]
        ax.plot(*start, marker="o", ms=10, mfc="white", mec="black", ls="none", label="start")
        ax.plot(*goal_xy, marker="*", ms=18, mfc="red", mec="white", ls="none", label="goal")
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_aspect("equal")
        ax.set_xlabel("torso x")
        ax.set_ylabel("torso y")
        ax.set_title(f"{env_id}: {agent.label}\nepoch {agent.epoch}, {agent.env_steps:,} env steps", fontsize=9)
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
        fig.colorbar(im, ax=ax, shrink=0.8, label=f"f(s, pi(s,g), g)  [{agent.args.energy}]")
        finite = v[np.isfinite(v)]
        stats.append(
            {**agent.run_info, "points": int(finite.size), "min": float(finite.min()), "max": float(finite.max())}
        )
    fig.suptitle("Critic value of reaching the goal (red star) from each torso position; walls grey", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="crl_deep run folders (same maze env)")
    parser.add_argument("--out", default=None, help="default: figures/qmap.png (qmap_s<seed>.png with --run-seed)")
    parser.add_argument(
        "--goal",
        nargs=2,
        type=float,
        default=None,
        metavar=("X", "Y"),
        help="goal position; default: the eval layout goal cell farthest from the start by path",
    )
    parser.add_argument("--run-seed", type=int, nargs="+", default=None, help=RUN_SEED_HELP)
    args = parser.parse_args(argv)
    args.out = args.out or seed_out_path("figures/qmap.png", args.run_seed)
    try:
        stats = plot_qmaps(args.runs, args.out, args.goal, args.run_seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in stats:
        print(s)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
