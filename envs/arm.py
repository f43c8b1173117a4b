"""Robot-arm tasks: a 7-DoF Panda-like arm must bring a 5 cm cube to a goal on the table.

The model (assets/arm.xml) is our own, built from capsules and boxes: Panda kinematics scaled by
1.4 (so that the whole workspace is reachable with the gripper pointing down), a parallel gripper,
a table whose top is at z = 0.005 (so the resting cube's centre is at z = 0.03, the goal height),
a cube, a non-colliding goal marker (a mocap body) and, for binpick, an open bin around the goal
region. MJX backend: timestep 0.002, 6 solver iterations, 12 line-search iterations, 25 substeps
per action (control dt 0.05 s). The arm is gravity-compensated and position-controlled.

Layout: the robot base is at the origin and faces +y; the cube starts in a region mirrored to the
goal region across x = 0 (cube on the left, goal on the right), so a task always means moving the
cube to the other side.

| task             | goal centre        | goal xy noise | cube centre   | cube xy noise |
|------------------|--------------------|---------------|---------------|---------------|
| arm_push_easy    | (0.1, 0.6, 0.03)   | +-0.1         | (-0.1, 0.6)   | +-0.1         |
| arm_push_hard    | (0.25, 0.65, 0.03) | +-0.25        | (-0.25, 0.65) | +-0.25        |
| arm_binpick_hard | (0.3, 0.6, 0.03)   | +-0.15 in bin | (-0.3, 0.6)   | +-0.15        |

State (17): cube xyz (3), the 7 arm joint angles, end-effector (the point between the finger
pads) xyz (3) and velocity (3), finger opening (1, the gap between the pads in metres).
Goal: cube xyz, state[0:3]. Observation: concat[state, goal] (20). Metrics: `success` (cube-goal
distance < 0.1), `dist`, `success_easy` (< 0.3), `success_hard` (< 0.03). The cube starts flat,
facing the robot (so the gripper, which turns with joint 1, meets it square).
Action (5) in [-1, 1]: absolute target angles for joints 1, 2, 4, 6, mapped linearly onto
TARGET_LOW..TARGET_HIGH; joints 3, 5, 7 are held at 0, 0, 1.4487; the 5th closes the gripper when
> 0 and opens it otherwise. The episode never terminates on its own.

`scripted_action(env, obs)` is a hand-written controller (push or pick-and-place) that solves the
tasks: the proof that they are solvable, and a source of demonstrations. `inverse_kinematics`
maps an end-effector point (gripper down) to the four actuated joints.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree

import jax
import jax.numpy as jnp
import mujoco
from brax.base import Motion, Transform
from brax.envs.base import PipelineEnv, State
from brax.io import mjcf
from brax.mjx import base as mjx_base
from brax.mjx import pipeline as mjx_pipeline
from mujoco import mjx

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "arm.xml")
N_FRAMES = 25  # substeps of 0.002 s per action: control dt 0.05 s
ARM_START = (1.571, 0.742, 0.0, -1.571, 0.0, 3.054, 1.449)  # joints 1-7
FINGER_OPEN = 0.04  # per finger: the pads are 8 cm apart when open
TARGET_LOW = (0.3491, 0.0, -3.0718, 2.3562)
TARGET_HIGH = (2.7925, 1.48353, -0.0698, 3.7525)
HELD = (0.0, 0.0, 1.4487)  # targets of joints 3, 5, 7
CUBE_HALF = 0.025
GOAL_Z = 0.03  # the resting cube's centre height
TABLE_TOP = 0.005
BIN_RIM_HEIGHT = 0.06  # the rim's capsules (radius 0.03) lie on the table

# task -> goal centre (x, y), goal xy noise, cube xy noise, whether a bin surrounds the goals
TASKS = {
    "push_easy": ((0.1, 0.6), 0.1, 0.1, False),
    "push_hard": ((0.25, 0.65), 0.25, 0.25, False),
    "binpick_hard": ((0.3, 0.6), 0.15, 0.15, True),
}


def load_model(task: str) -> mujoco.MjModel:
    """Compiles assets/arm.xml for `task`: the bin is centred on the goal region or removed.

    brax's `mjcf.load` fuses joint-less bodies into their parents, which would weld the mocap
    goal marker to the world, so the XML is compiled by mujoco directly.
    """
    root = ElementTree.parse(ASSET).getroot()
    worldbody = root.find("worldbody")
    bin_body = worldbody.find("body[@name='bin']")
    (goal_x, goal_y), _, _, has_bin = TASKS[task]
    if has_bin:
        bin_body.set("pos", f"{goal_x} {goal_y} {TABLE_TOP + BIN_RIM_HEIGHT / 2}")
    else:
        worldbody.remove(bin_body)
    return mujoco.MjModel.from_xml_string(ElementTree.tostring(root, encoding="unicode"))


class ArmEnv(PipelineEnv):
    """One arm task; use the subclasses ArmPushEasy, ArmPushHard, ArmBinpickHard."""

    state_dim = 17
    goal_indices = (0, 1, 2)
    goal_reach_thresh = 0.1

    def __init__(self, *, task: str):
        if task not in TASKS:
            raise ValueError(f"unknown arm task {task!r}; valid: {', '.join(TASKS)}")
        model = load_model(task)
        super().__init__(sys=mjcf.load_model(model), backend="mjx", n_frames=N_FRAMES)
        self.task = task
        goal_center, self._goal_noise, self._cube_noise, self.has_bin = TASKS[task]
        self._goal_center = jnp.array(goal_center)
        self._cube_center = jnp.array([-goal_center[0], goal_center[1]])  # mirrored across x = 0
        joint = lambda name: int(model.jnt_qposadr[model.joint(name).id])  # noqa: E731
        self._cube_q = joint("cube")
        self._finger_q = (joint("finger_left"), joint("finger_right"))
        self._ee_site = model.site("ee").id
        self._hand_link = model.site_bodyid[self._ee_site] - 1  # brax links skip the world body
        self._init_q = jnp.asarray(model.qpos0).at[:7].set(jnp.array(ARM_START))
        self._init_q = self._init_q.at[jnp.array(self._finger_q)].set(FINGER_OPEN)

    @property
    def dt(self) -> float:
        return float(self.sys.dt) * self._n_frames

    @property
    def action_size(self) -> int:
        return 5

    @property
    def observation_size(self) -> int:
        return self.state_dim + len(self.goal_indices)

    def reset(self, rng: jax.Array) -> State:
        key_goal, key_cube = jax.random.split(rng)
        goal_xy = self._goal_center + self._goal_noise * jax.random.uniform(key_goal, (2,), minval=-1, maxval=1)
        cube_xy = self._cube_center + self._cube_noise * jax.random.uniform(key_cube, (2,), minval=-1, maxval=1)
        goal = jnp.concatenate([goal_xy, jnp.array([GOAL_Z])])
        # The cube faces the robot: its sides are aligned with the gripper, which turns with joint 1.
        half_yaw = 0.5 * jnp.arctan2(cube_xy[1], cube_xy[0])
        cube = jnp.concatenate([cube_xy, jnp.array([GOAL_Z, jnp.cos(half_yaw), 0.0, 0.0, jnp.sin(half_yaw)])])
        q = self._init_q.at[self._cube_q:self._cube_q + 7].set(cube)
        pipeline_state = self._start_state(q, goal)
        obs = self._observe(pipeline_state)
        zero = jnp.zeros(())
        return State(pipeline_state, obs, zero, zero, self._metrics(obs))

    def _start_state(self, q: jax.Array, goal: jax.Array) -> mjx_base.State:
        """The pipeline state at rest in pose `q`, the goal marker at `goal`.

        Same result as `pipeline_init` (which runs the full MJX forward dynamics: collision and
        constraint solver) for everything the observation and the next step read: at rest only
        the kinematics matter, and every step recomputes contacts and forces from q and qd.
        Compiling kinematics alone makes reset about 6x cheaper to compile on CPU (3.8 s against
        24.5 s, measured once on a loaded 2-core machine); tests/test_envs_arm.py checks the
        start state against the model.
        """
        qd = jnp.zeros(self.sys.qd_size())
        data = mjx.make_data(self.sys).replace(qpos=q, qvel=qd, mocap_pos=goal[None])
        data = mjx_pipeline._reformat_contact(self.sys, mjx.kinematics(self.sys, data))
        x = Transform(pos=data.xpos[1:], rot=data.xquat[1:])
        xd = Motion(vel=jnp.zeros_like(x.pos), ang=jnp.zeros_like(x.pos))
        return mjx_base.State(q=q, qd=qd, x=x, xd=xd, **data.__dict__)

    def step(self, state: State, action: jax.Array) -> State:
        pipeline_state = self.pipeline_step(state.pipeline_state, self._control(action))
        obs = self._observe(pipeline_state)
        metrics = self._metrics(obs)
        state.metrics.update(metrics)
        return state.replace(pipeline_state=pipeline_state, obs=obs, reward=metrics["success"])

    def _control(self, action: jax.Array) -> jax.Array:
        """Actions -> position-actuator targets (7 joints, then both fingers)."""
        action = jnp.clip(action, -1.0, 1.0)
        low, high = jnp.array(TARGET_LOW), jnp.array(TARGET_HIGH)
        targets = low + 0.5 * (action[:4] + 1.0) * (high - low)
        finger = jnp.where(action[4] > 0, 0.0, FINGER_OPEN)
        return jnp.array([targets[0], targets[1], HELD[0], targets[2], HELD[1], targets[3], HELD[2], finger, finger])

    def _observe(self, pipeline_state) -> jax.Array:
        q = pipeline_state.q
        cube = q[self._cube_q:self._cube_q + 3]
        opening = q[self._finger_q[0]] + q[self._finger_q[1]]
        ee = pipeline_state.site_xpos[self._ee_site]
        hand_vel, hand_ang = pipeline_state.xd.vel[self._hand_link], pipeline_state.xd.ang[self._hand_link]
        ee_vel = hand_vel + jnp.cross(hand_ang, ee - pipeline_state.x.pos[self._hand_link])
        return jnp.concatenate([cube, q[:7], ee, ee_vel, opening[None], pipeline_state.mocap_pos[0]])

    def _metrics(self, obs: jax.Array) -> dict[str, jax.Array]:
        dist = jnp.linalg.norm(obs[0:3] - obs[self.state_dim:])
        return {
            "success": (dist < self.goal_reach_thresh).astype(jnp.float32),
            "dist": dist,
            "success_easy": (dist < 0.3).astype(jnp.float32),
            "success_hard": (dist < 0.03).astype(jnp.float32),
        }


# Planar kinematics of the arm with joints 3, 5 = 0: in the vertical plane at azimuth joint 1, with
# coordinates (r, z) = (horizontal distance from the base axis, height), the chain is: shoulder at
# (0, SHOULDER_Z); elbow = shoulder + R(q2) UPPER_ARM; wrist = elbow + R(q2 - q4) FOREARM;
# end effector = wrist + R(q2 - q4 - q6) HAND, where R(a) tilts "up" forward by a. The gripper
# points straight down when q6 = q2 - q4. (Numbers: assets/arm.xml.)
SHOULDER_Z = 0.4662
UPPER_ARM = (0.1155, 0.4424)
FOREARM = (-0.1155, 0.5376)
HAND = (0.1232, -0.2532)

# Scripted controller settings (metres; the end effector is the point between the finger pads).
SAFE_Z = 0.1  # travel height: the pads clear the cube
CARRY_Z = 0.11  # carry height: the held cube clears the bin rim
MAX_MOVE = 0.04  # per control step: the end effector is led along straight lines
PUSH_BACKOFF = 0.055  # distance behind the cube centre where a push starts
PUSH_Z = 0.035  # end-effector height while pushing (pads just above the table)
PUSH_STEP = 0.02  # per control step while pushing: slow enough that the cube does not slide on
PUSH_DONE = 0.02  # cube this close to the goal: stop pushing and lift
GRASP_TOL = 0.012  # end effector this close to the cube centre: close the gripper
DESCEND_STEP = 0.015  # per control step when lowering the open gripper around the cube
# Horizontal distances from the base axis reachable with the gripper down, per height, with 1 cm
# to spare (from inverse_kinematics and the action ranges; tests/test_envs_arm.py checks them).
REACH_Z = (0.02, 0.06, 0.1, 0.12, 0.16, 0.2)
REACH_MIN = (0.34, 0.37, 0.395, 0.4, 0.49, 0.56)
REACH_MAX = (1.015, 1.005, 0.99, 0.98, 0.96, 0.93)


def inverse_kinematics(position: jax.Array) -> jax.Array:
    """Targets for joints 1, 2, 4, 6 that put the end effector at `position`, gripper down.

    Elbow-up solution of the two-link problem shoulder -> wrist; out-of-reach targets give the
    stretched arm pointing at them.
    """
    length1, length2 = jnp.hypot(*UPPER_ARM), jnp.hypot(*FOREARM)
    offset1, offset2 = jnp.arctan2(*UPPER_ARM), jnp.arctan2(*FOREARM)
    azimuth = jnp.arctan2(position[1], position[0])
    wrist_r = jnp.hypot(position[0], position[1]) - HAND[0]
    wrist_z = position[2] - HAND[1] - SHOULDER_Z
    reach = jnp.hypot(wrist_r, wrist_z)
    cos_bend = (reach**2 - length1**2 - length2**2) / (2 * length1 * length2)
    bend = jnp.arccos(jnp.clip(cos_bend, -1.0, 1.0))
    upper = jnp.arctan2(wrist_r, wrist_z) - jnp.arctan2(length2 * jnp.sin(bend), length1 + length2 * jnp.cos(bend))
    q2 = upper - offset1
    q4 = offset2 - offset1 - bend
    return jnp.array([azimuth, q2, q4, q2 - q4])


def joint_targets_to_action(targets: jax.Array, close: jax.Array) -> jax.Array:
    """Inverse of the action mapping: targets for joints 1, 2, 4, 6 (clipped) and the gripper."""
    low, high = jnp.array(TARGET_LOW), jnp.array(TARGET_HIGH)
    arm = jnp.clip(2.0 * (targets - low) / (high - low) - 1.0, -1.0, 1.0)
    return jnp.concatenate([arm, jnp.where(close, 1.0, -1.0)[None]])


def _push_waypoint(cube, goal, ee):
    """Where to lead the end effector to push the cube (gripper closed) towards the goal."""
    to_goal = goal[:2] - cube[:2]
    distance = jnp.linalg.norm(to_goal)
    direction = to_goal / jnp.maximum(distance, 1e-6)
    start = cube[:2] - PUSH_BACKOFF * direction
    relative = ee[:2] - cube[:2]
    along = relative @ direction
    lateral = jnp.linalg.norm(relative - along * direction)
    low = ee[2] < PUSH_Z + 0.015
    behind = (lateral < 0.015) & (along < -0.03) & (along > -PUSH_BACKOFF - 0.02) & low
    # Pushing: stay on the line through the cube centre, advance by at most PUSH_STEP.
    push = cube[:2] + direction * (along + jnp.minimum(PUSH_STEP, distance))
    at_start = jnp.linalg.norm(ee[:2] - start) < 0.02
    high = ee[2] > SAFE_Z - 0.03
    waypoint = jnp.where(
        behind, jnp.append(push, PUSH_Z),
        jnp.where(at_start, jnp.append(start, PUSH_Z),
                  jnp.where(high, jnp.append(start, SAFE_Z), jnp.append(ee[:2], SAFE_Z))))
    done = distance < PUSH_DONE
    waypoint = jnp.where(done, jnp.append(ee[:2], SAFE_Z), waypoint)
    return waypoint, jnp.ones((), bool), jnp.where(behind, PUSH_STEP, MAX_MOVE)


def _pick_waypoint(cube, goal, ee, opening):
    """Where to lead the end effector to carry the cube to the goal, and whether to close."""
    holding = (jnp.linalg.norm(cube - ee) < 0.02) & (opening < 0.06) & (opening > 0.03)
    placed = jnp.linalg.norm(cube[:2] - goal[:2]) < 0.02
    above_goal = jnp.linalg.norm(ee[:2] - goal[:2]) < 0.01
    above_cube = jnp.linalg.norm(ee[:2] - cube[:2]) < 0.006
    lifted = ee[2] > CARRY_Z - 0.02
    high = ee[2] > SAFE_Z - 0.03
    release = jnp.append(goal[:2], GOAL_Z + 0.005)
    carry = jnp.where(above_goal, release,
                      jnp.where(lifted, jnp.append(goal[:2], CARRY_Z), jnp.append(ee[:2], CARRY_Z)))
    grasp = jnp.append(cube[:2], cube[2] + 0.005)
    approach = jnp.where(above_cube, grasp,
                         jnp.where(high, jnp.append(cube[:2], SAFE_Z), jnp.append(ee[:2], SAFE_Z)))
    retreat = jnp.append(ee[:2], CARRY_Z)
    waypoint = jnp.where(holding, carry, jnp.where(placed, retreat, approach))
    near_cube = jnp.linalg.norm(cube - ee) < GRASP_TOL
    at_release = jnp.linalg.norm(ee - release) < 0.012
    close = jnp.where(holding, ~at_release, near_cube & ~placed)
    careful = (above_cube & ~holding) | (holding & above_goal)  # final descents: slowly
    return waypoint, close, jnp.where(careful, DESCEND_STEP, MAX_MOVE)


def scripted_action(env: ArmEnv, obs: jax.Array, grasp: bool | None = None) -> jax.Array:
    """A hand-written controller for one observation (jit/vmap it): pushes the cube to the goal,
    or, with `grasp` (default: for the bin task), picks it up and places it there.

    Stateless: the phase (approach, descend, push / grasp, carry, release) is read off the cube,
    end-effector and gripper positions in `obs`, so it recovers when the cube slips. The end
    effector is led towards the phase's waypoint by at most MAX_MOVE per step, through
    `inverse_kinematics` (gripper pointing down).
    """
    grasp = env.has_bin if grasp is None else grasp
    cube, ee, opening, goal = obs[0:3], obs[10:13], obs[16], obs[env.state_dim:env.state_dim + 3]
    if grasp:
        waypoint, close, speed = _pick_waypoint(cube, goal, ee, opening)
    else:
        waypoint, close, speed = _push_waypoint(cube, goal, ee)
    move = waypoint - ee
    target = ee + move * jnp.minimum(1.0, speed / jnp.maximum(jnp.linalg.norm(move), 1e-6))
    # Keep the target where the gripper can point down within the joint ranges (the start pose is
    # outside that region); otherwise the arm tilts and the loop through `ee` runs away.
    height = jnp.clip(target[2], REACH_Z[0], REACH_Z[-1])
    radius = jnp.linalg.norm(target[:2])
    heights = jnp.array(REACH_Z)
    bounded = jnp.clip(radius, jnp.interp(height, heights, jnp.array(REACH_MIN)),
                       jnp.interp(height, heights, jnp.array(REACH_MAX)))
    target = jnp.append(target[:2] * bounded / jnp.maximum(radius, 1e-6), height)
    return joint_targets_to_action(inverse_kinematics(target), close)


class ArmPushEasy(ArmEnv):
    """Push the cube a short way (goals within 0.1 of (0.1, 0.6))."""

    def __init__(self):
        super().__init__(task="push_easy")


class ArmPushHard(ArmEnv):
    """Push the cube across a 1 m x 0.5 m workspace (goals within 0.25 of (0.25, 0.65))."""

    def __init__(self):
        super().__init__(task="push_hard")


class ArmBinpickHard(ArmEnv):
    """Pick the cube up and place it in a bin (goals within 0.15 of (0.3, 0.6))."""

    def __init__(self):
        super().__init__(task="binpick_hard")
