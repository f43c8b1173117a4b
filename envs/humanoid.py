"""Humanoid: a 3-D biped must bring its torso to a target at standing height.

State (268): full qpos (26 = humanoid 24 + the target's 2 slide joints), full qvel (25), per link
(12 links, the target included) its inertia matrix about the system's centre of mass (9) and mass
(1), per link its centre-of-mass linear velocity times its mass share (3) and angular velocity (3),
and the actuator forces as generalized forces (25). The link inertias are those the paper's code
observes (brax's humanoid env on the spring backend: the spring pipeline's simplified inertias, an
identity rotational inertia per link for this model); `true_inertia_obs=True` reports the model's
physical inertias instead. Goal: torso xyz, state[0:3], commanded as
(target x, target y, 1.25). Success: 3-D distance < 0.5 (easy: < 2). The episode terminates when
the torso z leaves [1.0, 2.0]. Actions in [-1, 1] are mapped linearly onto the actuators' ctrl range.
The maze variants (envs/maze.py) reuse this class with walls and another start/goal draw.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from brax import actuator, math
from brax.envs.base import PipelineEnv, State
from brax.io import mjcf

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "humanoid.xml")
BACKENDS = ("spring", "mjx")
TARGET_Z = 1.25  # about the torso height of the standing humanoid
TARGET_RADIUS = (1.0, 5.0)
EASY_THRESH = 2.0
HEALTHY_Z = (1.0, 2.0)


def load_system(xml: str, substep: float, backend: str):
    """Builds a brax System from MJCF text with the physics substep set where each pipeline reads it.

    brax 0.10.1's spring pipeline integrates with its own `System.dt` and ignores
    `opt.timestep`; mjx reads `opt.timestep`. Both are set.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    sys = mjcf.loads(xml, asset_path=os.path.dirname(ASSET))
    return sys.tree_replace({"opt.timestep": substep}).replace(dt=jnp.asarray(substep))


def observed_inertia(sys, backend: str, true_inertia_obs: bool):
    """The link inertias the observation reports.

    The paper's code computes them as brax's own humanoid env does: on the spring backend it takes
    the inertias the spring pipeline simulates with, each link's inertia diagonal raised to the
    power 1 - spring_inertia_scale (off-diagonal terms dropped) and its mass to 1 -
    spring_mass_scale. This model sets the scales to 1 and 0: identity rotational inertias, true
    masses. On mjx (and with true_inertia_obs) they are the model's physical inertias.
    """
    inertia = sys.link.inertia
    if true_inertia_obs or backend != "spring":
        return inertia
    diagonal = jnp.diagonal(inertia.i, axis1=1, axis2=2) ** (1 - sys.spring_inertia_scale)
    return inertia.replace(i=jax.vmap(jnp.diag)(diagonal), mass=inertia.mass ** (1 - sys.spring_mass_scale))


class Humanoid(PipelineEnv):
    state_dim = 268
    goal_indices = (0, 1, 2)
    goal_reach_thresh = 0.5
    substep = 0.003  # x 10 frames: control dt 0.03 s
    n_frames = 10

    def __init__(self, *, backend: str = "spring", reset_noise_scale: float = 0.0, true_inertia_obs: bool = False):
        if reset_noise_scale < 0:
            raise ValueError(f"reset_noise_scale must be >= 0, got {reset_noise_scale}")
        if not isinstance(true_inertia_obs, bool):
            raise TypeError(f"true_inertia_obs must be a bool, got {true_inertia_obs!r}")
        sys = load_system(self._mjcf(), self.substep, backend)
        super().__init__(sys=sys, backend=backend, n_frames=self.n_frames)
        self._reset_noise_scale = reset_noise_scale
        self.true_inertia_obs = true_inertia_obs
        self._obs_inertia = observed_inertia(self.sys, backend, true_inertia_obs)
        self._target_rest = self.sys.link.transform.pos[self.sys.link_names.index("target")]
        self._robot_q = self.sys.q_size() - 2  # the target's two slide joints come last
        self._robot_qd = self.sys.qd_size() - 2

    def _mjcf(self) -> str:
        with open(ASSET) as f:
            return f.read()

    def _sample_start_goal(self, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Torso start xy and target xy: start at the origin, target at radius U[1, 5], any angle."""
        key_radius, key_angle = jax.random.split(rng)
        radius = jax.random.uniform(key_radius, minval=TARGET_RADIUS[0], maxval=TARGET_RADIUS[1])
        angle = 2 * jnp.pi * jax.random.uniform(key_angle)
        return jnp.zeros(2), radius * jnp.array([jnp.cos(angle), jnp.sin(angle)])

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
            jnp.zeros(self.sys.qd_size())
            .at[: self._robot_qd]
            .set(jax.random.uniform(key_qd, (self._robot_qd,), minval=-noise, maxval=noise))
        )
        return self.reset_to(q, qd, jnp.append(target, TARGET_Z))

    def reset_to(self, q: jax.Array, qd: jax.Array, goal: jax.Array) -> State:
        """The State `reset` returns for joint positions q, velocities qd (the full layout, target
        joints last) and goal (x, y, z): goal xy sets the target joints of q, overriding their
        values; the goal height is always TARGET_Z, so goal z is not read."""
        q = jnp.asarray(q).at[self._robot_q :].set(jnp.asarray(goal)[:2] - self._target_rest[:2])
        pipeline_state = self.pipeline_init(q, jnp.asarray(qd))
        obs = self._observe(pipeline_state, jnp.zeros(self.sys.act_size()))
        zero = jnp.zeros(())
        return State(pipeline_state, obs, zero, zero, self._metrics(obs))

    def step(self, state: State, action: jax.Array) -> State:
        low, high = self.sys.actuator.ctrl_range[:, 0], self.sys.actuator.ctrl_range[:, 1]
        ctrl = low + (action + 1.0) * 0.5 * (high - low)
        pipeline_state = self.pipeline_step(state.pipeline_state, ctrl)
        obs = self._observe(pipeline_state, ctrl)
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

    def _observe(self, pipeline_state, ctrl: jax.Array) -> jax.Array:
        inertia = self._obs_inertia
        x, xd = pipeline_state.x, pipeline_state.xd
        # Each link's centre of mass and rotation of its principal frame, in world coordinates.
        com_pos = x.pos + jax.vmap(math.rotate)(inertia.transform.pos, x.rot)
        com_rot = jax.vmap(math.quat_mul)(x.rot, inertia.transform.rot)
        mass_sum = inertia.mass.sum()
        system_com = (inertia.mass[:, None] * com_pos).sum(0) / mass_sum
        # Inertia about the system's centre of mass: rotate to world, then the parallel-axis term.
        rot_mat = jax.vmap(math.quat_to_3x3)(com_rot)
        inertia_world = rot_mat @ inertia.i @ jnp.swapaxes(rot_mat, 1, 2)
        offset = com_pos - system_com
        parallel = inertia.mass[:, None, None] * (
            jnp.einsum("li,li->l", offset, offset)[:, None, None] * jnp.eye(3) - offset[:, :, None] * offset[:, None, :]
        )
        com_inertia = jnp.concatenate([(inertia_world + parallel).reshape(-1, 9), inertia.mass[:, None]], axis=1)
        com_vel = xd.vel + jnp.cross(xd.ang, com_pos - x.pos)
        com_motion = jnp.concatenate([com_vel * (inertia.mass / mass_sum)[:, None], xd.ang], axis=1)
        qfrc_actuator = actuator.to_tau(self.sys, ctrl, pipeline_state.q, pipeline_state.qd)
        target_xy = self._target_rest[:2] + pipeline_state.q[self._robot_q :]
        return jnp.concatenate(
            [
                pipeline_state.q,
                pipeline_state.qd,
                com_inertia.ravel(),
                com_motion.ravel(),
                qfrc_actuator,
                target_xy,
                jnp.array([TARGET_Z]),
            ]
        )

    def _metrics(self, obs: jax.Array) -> dict[str, jax.Array]:
        dist = jnp.linalg.norm(obs[0:3] - obs[self.state_dim :])
        return {
            "success": (dist < self.goal_reach_thresh).astype(jnp.float32),
            "success_easy": (dist < EASY_THRESH).astype(jnp.float32),
            "dist": dist,
        }
