"""Reacher: a two-link planar arm must bring its fingertip onto a target.

State (10): cos(joint angles) (2), sin(joint angles) (2), fingertip xyz (3), fingertip velocity (3;
as the paper's code computes it, with the fingertip offset in world axes, see `_observe`).
Goal: fingertip xyz, i.e. state[4:7], commanded as the target body's position (its rest xyz moved
by its two slide joints; under the spring pipeline it sags a few mm, as in the paper's code).
Success: distance < 0.05.
The episode never terminates on its own.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from brax import math
from brax.envs.base import PipelineEnv, State
from brax.io import mjcf

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "reacher.xml")
BACKENDS = ("spring", "mjx")
SUBSTEP = 0.005  # with 4 substeps per action: control dt 0.02 s
N_FRAMES = 4
TARGET_RADIUS = 0.2
FINGERTIP_OFFSET = (0.11, 0.0, 0.0)  # fingertip centre in the second link's frame


def load_system(path: str, substep: float, backend: str):
    """Loads an MJCF file and sets the physics substep where the chosen pipeline reads it.

    brax 0.10.1's spring pipeline integrates with its own `System.dt` and ignores
    `opt.timestep` (the paper's code sets only the latter, so its reacher integrates at the XML's
    0.01 s and turns NaN within about 11 steps); mjx reads `opt.timestep`. Both are set.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    sys = mjcf.load(path)
    return sys.tree_replace({"opt.timestep": substep}).replace(dt=jnp.asarray(substep))


class Reacher(PipelineEnv):
    state_dim = 10
    goal_indices = (4, 5, 6)
    goal_reach_thresh = 0.05

    def __init__(self, *, backend: str = "spring"):
        super().__init__(sys=load_system(ASSET, SUBSTEP, backend), backend=backend, n_frames=N_FRAMES)
        self._arm_link = self.sys.link_names.index("body1")
        # The target's rest position; its slide joints move it in xy.
        self._target_link = self.sys.link_names.index("target")
        self._target_rest = self.sys.link.transform.pos[self._target_link]

    @property
    def dt(self) -> float:
        return float(self.sys.dt) * self._n_frames

    @property
    def observation_size(self) -> int:
        return self.state_dim + len(self.goal_indices)

    def reset(self, rng: jax.Array) -> State:
        key_q, key_qd, key_radius, key_angle = jax.random.split(rng, 4)
        q = self.sys.init_q + jax.random.uniform(key_q, (self.sys.q_size(),), minval=-0.1, maxval=0.1)
        qd = jax.random.uniform(key_qd, (self.sys.qd_size(),), minval=-0.005, maxval=0.005)
        # Target: radius and angle uniform (the benchmark's draw; denser near the centre).
        radius = TARGET_RADIUS * jax.random.uniform(key_radius)
        angle = 2 * jnp.pi * jax.random.uniform(key_angle)
        qd = qd.at[2:].set(0.0)
        goal = self._target_rest.at[:2].add(radius * jnp.array([jnp.cos(angle), jnp.sin(angle)]))
        return self.reset_to(q, qd, goal)

    def reset_to(self, q: jax.Array, qd: jax.Array, goal: jax.Array) -> State:
        """The State `reset` returns for joint positions q, velocities qd (arm joints, then the
        target's two slide joints) and goal xyz: goal xy sets the target joints of q, overriding
        their values; the target moves in its plane only, so goal z is not read."""
        q = jnp.asarray(q).at[2:].set(jnp.asarray(goal)[:2] - self._target_rest[:2])
        pipeline_state = self.pipeline_init(q, jnp.asarray(qd))
        obs = self._observe(pipeline_state)
        zero = jnp.zeros(())
        return State(pipeline_state, obs, zero, zero, self._metrics(obs))

    def step(self, state: State, action: jax.Array) -> State:
        pipeline_state = self.pipeline_step(state.pipeline_state, action)
        obs = self._observe(pipeline_state)
        metrics = self._metrics(obs)
        return state.replace(
            pipeline_state=pipeline_state, obs=obs, reward=metrics["success"], metrics={**state.metrics, **metrics}
        )

    def _observe(self, pipeline_state) -> jax.Array:
        theta = pipeline_state.q[:2]
        link_pos = pipeline_state.x.pos[self._arm_link]
        offset = math.rotate(jnp.array(FINGERTIP_OFFSET), pipeline_state.x.rot[self._arm_link])
        link_vel, link_ang = pipeline_state.xd.vel[self._arm_link], pipeline_state.xd.ang[self._arm_link]
        # As the paper's code computes it: the fingertip offset enters the velocity in world axes, not
        # rotated with the link (so this is the velocity of the point 0.11 m along world x from the
        # link origin, moving with the link; the position above uses the rotated offset).
        tip_vel = link_vel + jnp.cross(link_ang, jnp.array(FINGERTIP_OFFSET))
        # The goal is the target body's position, as the paper's code reads it: the spring pipeline's
        # soft joints let the body sag under gravity (z settles from 0.01 to 0.007 within ~10 steps).
        target = pipeline_state.x.pos[self._target_link]
        return jnp.concatenate([jnp.cos(theta), jnp.sin(theta), link_pos + offset, tip_vel, target])

    def _metrics(self, obs: jax.Array) -> dict[str, jax.Array]:
        dist = jnp.linalg.norm(obs[4:7] - obs[self.state_dim :])
        return {"success": (dist < self.goal_reach_thresh).astype(jnp.float32), "dist": dist}
