"""Ant: a quadruped must walk its torso to a target on the floor.

State (29): ant qpos without the target joints (15: torso xyz, torso quaternion, 8 hinge angles)
and qvel without the target joints (14). Goal: torso xy, state[0:2], commanded as the target's xy.
Success: distance < 0.5 (easy: < 2). The episode terminates when the torso z leaves [0.2, 1.0].
The maze variants (envs/maze.py) reuse this class with walls and another start/goal draw.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from brax.envs.base import PipelineEnv, State
from brax.io import mjcf

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "ant.xml")
BACKENDS = ("spring", "mjx")
TARGET_RADIUS = 10.0
EASY_THRESH = 2.0
HEALTHY_Z = (0.2, 1.0)


def load_system(xml: str, substep: float, backend: str):
    """Builds a brax System from MJCF text with the physics substep set where each pipeline reads it.

    brax 0.10.1's spring pipeline integrates with its own `System.dt` and ignores
    `opt.timestep`; mjx reads `opt.timestep`. Both are set.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    sys = mjcf.loads(xml, asset_path=os.path.dirname(ASSET))
    return sys.tree_replace({"opt.timestep": substep}).replace(dt=jnp.asarray(substep))


class Ant(PipelineEnv):
    state_dim = 29
    goal_indices = (0, 1)
    goal_reach_thresh = 0.5
    substep = 0.005  # x 10 frames: control dt 0.05 s
    n_frames = 10

    def __init__(self, *, backend: str = "spring", reset_noise_scale: float = 0.1):
        if reset_noise_scale < 0:
            raise ValueError(f"reset_noise_scale must be >= 0, got {reset_noise_scale}")
        sys = load_system(self._mjcf(), self.substep, backend)
        super().__init__(sys=sys, backend=backend, n_frames=self.n_frames)
        self._reset_noise_scale = reset_noise_scale
        self._target_rest = self.sys.link.transform.pos[self.sys.link_names.index("target")]
        self._robot_q = self.sys.q_size() - 2  # the target's two slide joints come last
        self._robot_qd = self.sys.qd_size() - 2

    def _mjcf(self) -> str:
        with open(ASSET) as f:
            return f.read()

    def _sample_start_goal(self, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Torso start xy and target xy: start at the origin, target on a circle of radius 10."""
        angle = 2 * jnp.pi * jax.random.uniform(rng)
        return jnp.zeros(2), TARGET_RADIUS * jnp.array([jnp.cos(angle), jnp.sin(angle)])

    @property
    def dt(self) -> float:
        return float(self.sys.dt) * self._n_frames

    @property
    def observation_size(self) -> int:
        return self.state_dim + len(self.goal_indices)

    def reset(self, rng: jax.Array) -> State:
        key_q, key_qd, key_task = jax.random.split(rng, 3)
        start, target = self._sample_start_goal(key_task)
        noise = self._reset_noise_scale
        q = self.sys.init_q.at[: self._robot_q].add(
            jax.random.uniform(key_q, (self._robot_q,), minval=-noise, maxval=noise)
        )
        q = q.at[:2].add(start)
        q = q.at[3:7].set(q[3:7] / jnp.linalg.norm(q[3:7]))  # keep the torso quaternion a rotation
        qd = (
            jnp.zeros(self.sys.qd_size()).at[: self._robot_qd].set(noise * jax.random.normal(key_qd, (self._robot_qd,)))
        )
        return self.reset_to(q, qd, target)

    def reset_to(self, q: jax.Array, qd: jax.Array, goal: jax.Array) -> State:
        """The State `reset` returns for joint positions q, velocities qd (the full layout, target
        joints last) and goal xy: the goal sets the target joints of q, overriding their values."""
        q = jnp.asarray(q).at[self._robot_q :].set(jnp.asarray(goal)[:2] - self._target_rest[:2])
        pipeline_state = self.pipeline_init(q, jnp.asarray(qd))
        obs = self._observe(pipeline_state)
        zero = jnp.zeros(())
        return State(pipeline_state, obs, zero, zero, self._metrics(obs))

    def step(self, state: State, action: jax.Array) -> State:
        pipeline_state = self.pipeline_step(state.pipeline_state, action)
        obs = self._observe(pipeline_state)
        metrics = self._metrics(obs)
        torso_z = pipeline_state.x.pos[0, 2]
        done = ((torso_z < HEALTHY_Z[0]) | (torso_z > HEALTHY_Z[1])).astype(jnp.float32)
        return state.replace(
            pipeline_state=pipeline_state,
            obs=obs,
            reward=metrics["success"],
            done=done,
            metrics={**state.metrics, **metrics},
        )

    def _observe(self, pipeline_state) -> jax.Array:
        target_xy = self._target_rest[:2] + pipeline_state.q[self._robot_q :]
        return jnp.concatenate([pipeline_state.q[: self._robot_q], pipeline_state.qd[: self._robot_qd], target_xy])

    def _metrics(self, obs: jax.Array) -> dict[str, jax.Array]:
        dist = jnp.linalg.norm(obs[0:2] - obs[self.state_dim :])
        return {
            "success": (dist < self.goal_reach_thresh).astype(jnp.float32),
            "success_easy": (dist < EASY_THRESH).astype(jnp.float32),
            "dist": dist,
        }
