"""Makes a small dataset in the exact OGBench format by rolling out an OGBench env here (the OGBench
dataset host cannot be reached), plus its `-val.npz` twin.

    python -m tools.make_ogbench_dataset --env pointmaze-medium-navigate-v0 --out data/pm.npz \
        --policy noisy_oracle --num-trajectories 50 --trajectory-length 500

File layout (as OGBench's): one row per visited state, trajectories back to back; `terminals` is 1 on
the last row of each trajectory, whose action has no recorded next state. Keys `observations`
[N, obs_dim], `actions` [N, action_dim], `terminals` [N], `qpos`, `qvel` (float32).

Policies: `random` (uniform actions; any env) and `noisy_oracle` (point mazes only: heads for the
next cell of the shortest path to a goal cell, plus Gaussian noise; a new random goal cell each time
one is reached, like OGBench's navigate data). Start cells are drawn uniformly among free cells.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too

import dataclasses
from typing import Literal

import numpy as np
import tyro


@dataclasses.dataclass
class Args:
    env: str = "pointmaze-medium-navigate-v0"
    """OGBench env or dataset name (the dataset type, e.g. 'navigate', is dropped to make the env)"""
    out: str = ""
    """output path ending in .npz; the validation twin goes to <out without .npz>-val.npz"""
    num_trajectories: int = 20
    """trajectories in the training file"""
    val_trajectories: int = 2
    """trajectories in the -val file (0: no -val file)"""
    trajectory_length: int = 200
    """transitions per trajectory (rows per trajectory = this + 1)"""
    policy: Literal["random", "noisy_oracle"] = "random"
    """behaviour policy: uniform random actions, or the noisy shortest-path oracle (point mazes)"""
    noise: float = 0.5
    """std of the Gaussian noise added to the oracle's unit direction (noisy_oracle)"""
    seed: int = 0
    """seed of starts, goals and noise (the -val file uses seed + 1)"""


def check_args(args: Args) -> None:
    """Rejects bad input with one line (exit code 2)."""
    if not args.out.endswith(".npz"):
        raise SystemExit("error: --out must be a path ending in .npz")
    if args.num_trajectories <= 0 or args.trajectory_length <= 0 or args.val_trajectories < 0:
        raise SystemExit("error: --num-trajectories and --trajectory-length must be positive, --val-trajectories >= 0")
    if args.policy == "noisy_oracle" and not args.env.startswith("pointmaze"):
        raise SystemExit(f"error: --policy noisy_oracle needs a point maze (actions are xy moves), not {args.env!r}")
    if args.noise < 0:
        raise SystemExit(f"error: --noise must be >= 0, got {args.noise}")


def make_env(name: str, trajectory_length: int):
    """The env without its goal termination and with a time limit past the trajectory length."""
    import ogbench

    try:
        return ogbench.make_env_and_datasets(
            name, env_only=True, terminate_at_goal=False, max_episode_steps=trajectory_length + 1
        )
    except Exception as e:  # gymnasium raises several types for unknown names
        raise SystemExit(f"error: cannot make OGBench env {name!r} ({e})") from None


def free_cells(maze) -> list:
    return [tuple(ij) for ij in np.argwhere(maze.maze_map == 0)]


def oracle_action(maze, goal_xy, rng, noise):
    """Unit step towards the next cell of the shortest path to the goal (the goal itself in its cell)."""
    xy = maze.get_xy()
    target = goal_xy if maze.xy_to_ij(xy) == maze.xy_to_ij(goal_xy) else maze.get_oracle_subgoal(xy, goal_xy)[0]
    direction = np.asarray(target) - xy
    direction = direction / (np.linalg.norm(direction) + 1e-6)
    return np.clip(direction + noise * rng.standard_normal(2), -1.0, 1.0)


def rollout(env, args: Args, num_trajectories: int, seed: int) -> dict:
    """Rows of `num_trajectories` trajectories in OGBench layout."""
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    maze = env.unwrapped
    is_maze = hasattr(maze, "maze_map")
    cells = free_cells(maze) if is_maze else None
    rows = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
    for _ in range(num_trajectories):
        options = None
        if is_maze:
            start, goal = (cells[i] for i in rng.integers(len(cells), size=2))
            options = {"task_info": {"init_ij": start, "goal_ij": goal}}
        ob, _ = env.reset(seed=int(rng.integers(2**31)), options=options)
        goal_xy = maze.cur_goal_xy if is_maze else None
        for t in range(args.trajectory_length + 1):
            if args.policy == "noisy_oracle":
                action = oracle_action(maze, goal_xy, rng, args.noise)
            else:
                action = env.action_space.sample()
            rows["observations"].append(np.asarray(ob, np.float32))
            rows["actions"].append(np.asarray(action, np.float32))
            rows["terminals"].append(float(t == args.trajectory_length))
            rows["qpos"].append(np.asarray(maze.data.qpos, np.float32).copy())
            rows["qvel"].append(np.asarray(maze.data.qvel, np.float32).copy())
            if t == args.trajectory_length:
                break  # the last row's action has no recorded next state (OGBench layout)
            ob, _, _, _, info = env.step(action)
            if args.policy == "noisy_oracle" and info["success"]:
                maze.set_goal(goal_ij=cells[rng.integers(len(cells))])
                goal_xy = maze.cur_goal_xy
    return {k: np.asarray(v, np.float32) for k, v in rows.items()}


def write_npz_atomic(path: str, arrays: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    env = make_env(args.env, args.trajectory_length)
    train = rollout(env, args, args.num_trajectories, args.seed)
    write_npz_atomic(args.out, train)
    print(f"wrote {args.out}: {len(train['terminals'])} rows, {args.num_trajectories} trajectories")
    if args.val_trajectories:
        val_path = args.out[: -len(".npz")] + "-val.npz"
        write_npz_atomic(val_path, rollout(env, args, args.val_trajectories, args.seed + 1))
        print(f"wrote {val_path}: {args.val_trajectories} trajectories")
