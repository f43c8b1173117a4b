"""Rollout video of a checkpoint's deterministic policy, rendered headless (MP4 or GIF).

    MUJOCO_GL=osmesa python -m tools.video runs/<run> --out figures/rollout.mp4
    python -m tools.video runs/<run> --out figures/rollout.gif --steps 300 --every 3 --html figures/rollout.html
    python -m tools.video runs/<--num-seeds run> --run-seed 1        # seed 1's agent -> figures/rollout_s1.mp4

Renders `--num-envs` episodes from fresh resets of the run's evaluation env (the `_eval` variant
where one exists, or --env) and keeps the one that spent the most steps at the goal. The goal is
a translucent green sphere of the success radius (plus the env's own target body where it has one).
On CPU MuJoCo renders through OSMesa (`apt-get install libosmesa6`); on GPU machines MUJOCO_GL=egl.
`--html` also writes brax's interactive HTML viewer of the same episode (needs no OpenGL).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too

import argparse
import json

from tools.render import setup_gl

try:
    setup_gl()  # before anything imports mujoco
except RuntimeError as e:  # no OpenGL backend: say how to get one, in one line
    if __name__ == "__main__":
        sys.exit(f"error: {e}")
    raise

from tools.agent import best_episode, load_agent, rollout, seed_out_path
from tools.render import render_frames, write_video
from tools.runs import atomic_write


def make_video(
    run: str,
    out: str,
    env_id: str | None = None,
    steps: int = 1000,
    every: int = 2,
    num_envs: int = 8,
    seed: int = 0,
    width: int = 640,
    height: int = 480,
    camera: str = "auto",
    html: str | None = None,
    run_seed: int | None = None,
) -> dict:
    import jax
    import numpy as np

    import envs

    if steps < 1 or every < 1 or num_envs < 1:
        raise ValueError("--steps, --every and --num-envs must be >= 1")
    agent = load_agent(run, run_seed)
    env_id = env_id or envs.eval_variant(agent.args.env)
    env = envs.make(env_id)
    traj = rollout(env, agent, jax.random.PRNGKey(seed), num_envs, steps)
    i = best_episode(traj)
    alive = traj["alive"][:, i]
    last = int(np.nonzero(alive)[0][-1])  # stop at termination (the raw env keeps stepping)
    idx = np.arange(0, last + 1, every)
    qpos = traj["qpos"][idx, i]
    goals = traj["obs"][idx, i, env.state_dim :]
    scene_box = None
    if hasattr(env, "maze"):  # frame the maze, not the whole floor
        n_rows, n_cols, scale = len(env.maze.rows), len(env.maze.rows[0]), env.maze.scale
        scene_box = (((n_rows - 1) * scale / 2, (n_cols - 1) * scale / 2, 0.0), max(n_rows, n_cols) * scale)
    frames = render_frames(
        env.sys.mj_model, qpos, goals, env.goal_reach_thresh, width, height, camera, scene_box=scene_box
    )
    fps = 1.0 / (env.dt * every)
    write_video(frames, out, fps)
    info = {
        **agent.run_info,
        "video": out,
        "env": env_id,
        "episode": i,
        "frames": len(frames),
        "fps": round(fps, 2),
        "steps_at_goal": int((traj["success"][: last + 1, i]).sum()),
        "final_dist": float(traj["dist"][last, i]),
    }
    if html:
        info["html"] = write_html(env, qpos, html)
    return info


def write_html(env, qpos_seq, path: str) -> str:
    """brax's three.js viewer of the episode (envs' import patches brax.io.json's rgba defect)."""
    import jax
    import jax.numpy as jnp
    from brax.io import html

    init = jax.jit(lambda q: env.pipeline_init(q, jnp.zeros(env.sys.qd_size())))
    states = [init(jnp.asarray(q)) for q in qpos_seq]
    atomic_write(path, html.render(env.sys.tree_replace({"opt.timestep": env.dt}), states))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="crl_deep run folder (or its checkpoint.msgpack)")
    parser.add_argument(
        "--out", default=None, help=".mp4 or .gif; default: figures/rollout.mp4 (rollout_s<seed>.mp4 with --run-seed)"
    )
    parser.add_argument("--env", default=None, help="env id to roll out in; default: the run's eval env")
    parser.add_argument("--steps", type=int, default=1000, help="episode steps to roll out")
    parser.add_argument("--every", type=int, default=2, help="render every k-th step")
    parser.add_argument("--num-envs", type=int, default=8, help="episodes to choose the most successful from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--camera", default="auto", choices=["auto", "follow", "overview"])
    parser.add_argument("--html", default=None, help="also write brax's HTML viewer to this path")
    parser.add_argument(
        "--run-seed", type=int, default=None, help="which seed of a --num-seeds run to render (required there)"
    )
    args = parser.parse_args(argv)
    args.out = args.out or seed_out_path("figures/rollout.mp4", args.run_seed)
    try:
        info = make_video(
            args.run,
            args.out,
            args.env,
            args.steps,
            args.every,
            args.num_envs,
            args.seed,
            args.width,
            args.height,
            args.camera,
            args.html,
            args.run_seed,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
