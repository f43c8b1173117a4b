"""Robot-arm tasks (the paper's arm_push_easy, arm_push_hard, arm_binpick_hard): a Franka Panda arm
must bring a 6 cm cube to a goal on the table.

The model (assets/arm.xml) is the one the paper's code simulates: its MJCF files after brax's
`mjcf.load` has fused every joint-less body into its parent (see the XML's header for what that
changes), written out with primitive geoms only. MJX backend, as in the paper's code: timestep
0.002, implicitfast, Newton with 6 iterations and 12 line-search iterations, 25 substeps per
action (control dt 0.05 s), impratio 1 (push) or 10 (binpick). State layout (qpos 23, qvel 21):
cube free joint (qpos 0-6), goal-marker free joint (7-13, gravity cancelled, no contacts),
joints 1-7 (14-20), fingers (21-22, coupled by an equality).

| task             | cube start (x, y)       | goal (x, y, 0.03)       | region half-size | contacts            |
|------------------|-------------------------|-------------------------|------------------|---------------------|
| arm_push_easy    | (-0.1, 0.6) + U(+-0.1)  | (0.1, 0.6) + U(+-0.1)   | 0.1              | table, hand, pads   |
| arm_push_hard    | (-0.25, 0.65) + U(+-0.25)| (0.25, 0.65) + U(+-0.25)| 0.25            | table, hand, pads   |
| arm_binpick_hard | (-0.3, 0.6) + U(+-0.15) | (0.3, 0.6) + U(+-0.15)  | 0.15             | + two bins' walls   |

The cube starts 4 cm above the table (z = 0.07, it falls onto it in the first step), the arm at
ARM_START with the gripper open, everything at rest. A goal at z = 0.03 is the resting cube's
height, so lifting the cube counts against the distance.

State (17): cube xyz (3), joints 1-7 (7), link7's origin xyz (3) and its world velocity (3), the
distance between the two finger bodies (1). As in the paper's code, entries 10-16 come from the
kinematics MJX computed at the start of the last substep (0.002 s old after a step; exact at reset).
Goal: cube xyz, state[0:3]. Observation: concat[state, goal] (20). Metrics: `success` (cube-goal
distance < 0.1; also the reward), `dist`, `success_easy` (< 0.3), `success_hard` (< 0.03).
The episode never terminates on its own.

Action (5) in [-1, 1] (clipped): absolute targets CTRL_OFFSET + a * CTRL_HALF_RANGE for
joints 1, 2, 4, 6; joints 3, 5, 7 get the fixed targets 0, 0, 1.4487; the 5th action closes the
gripper when > 0 and opens it otherwise. The actuators of joints 3-7 are the paper's: their
position bias exceeds their gain, so those joints settle at 0.571 x (joints 3, 4) or 0.5 x
(joints 5-7) the target, and nothing compensates gravity.

`env.reset_to(q, qd, goal)` starts from a given physical state and goal (goldens, replays).

Speed (docs/envs.md, "Throughput"): `step` runs the 25 `mjx.step` substeps itself instead of
through brax's `pipeline_step`, and MJX's Newton line search as a while loop; both leave every
number bit-identical to brax's path (tests/test_envs_arm.py checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
import xml.etree.ElementTree as ElementTree

import jax
import jax.numpy as jnp
import mujoco
from brax.base import Motion, Transform
from brax.envs.base import PipelineEnv, State
from brax.io import mjcf
from brax.mjx import base as brax_mjx_base
from brax.mjx import pipeline as brax_mjx_pipeline
from mujoco import mjx
from mujoco.mjx._src import math as mjx_math
from mujoco.mjx._src import solver as mjx_solver

# MJX's convex collision (mujoco-mjx 3.2.6, collision_convex.py) writes `jp.finfo(float).max`, the float64
# maximum, into float32 distances that are already infinite; when a step is compiled, jax casts that constant
# to float32 (+inf, the value meant) and numpy warns "overflow encountered in cast" at every compile of an arm
# step. The numbers are right, so that one warning, from jax's constant cast alone, is silenced.
warnings.filterwarnings(
    "ignore", message="overflow encountered in cast", category=RuntimeWarning, module=r"jax\._src\.interpreters\.xla"
)

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "arm.xml")
N_FRAMES = 25  # substeps of 0.002 s per action: control dt 0.05 s
ARM_START = (1.571, 0.742, 0.0, -1.571, 0.0, 3.054, 1.449)  # joints 1-7
FINGER_START = 0.04  # per finger: open, the finger bodies 8 cm apart
CUBE_START_Z = 0.07
GOAL_Z = 0.03  # the resting cube's centre height (half-size 0.03, table top at z = 0)
# qpos / qvel layout
CUBE_Q, MARKER_Q, ARM_Q, FINGER_Q = 0, 7, 14, 21
NQ, NV = 23, 21
# brax link indices (MuJoCo body id - 1)
LINK7, LEFT_FINGER, RIGHT_FINGER = 8, 9, 10
# action -> targets of the actuated joints 1, 2, 4, 6 (offset + a * half range)
CTRL_OFFSET = (1.5708, 0.741765, -1.5708, 3.05435)
CTRL_HALF_RANGE = (1.2217, 0.741765, 1.501, 0.69815)
HELD = (0.0, 0.0, 1.4487)  # targets of joints 3, 5, 7
FINGER_CTRL_OPEN = 255.0  # finger actuators: ctrl 255 -> 0.08 m apart, 0 -> closed

# task -> cube region centre (x, y), goal region centre (x, y), region half-size, bins, impratio
TASKS = {
    "push_easy": ((-0.1, 0.6), (0.1, 0.6), 0.1, False, 1.0),
    "push_hard": ((-0.25, 0.65), (0.25, 0.65), 0.25, False, 1.0),
    "binpick_hard": ((-0.3, 0.6), (0.3, 0.6), 0.15, True, 10.0),
}


def load_model(task: str) -> mujoco.MjModel:
    """Compiles assets/arm.xml for `task`: the bin walls and their contact pairs are removed for
    the push tasks (whose models are then identical, so their programs compile once), binpick
    gets impratio 10. The XML is already the fused model, so it is compiled by MuJoCo directly."""
    root = ElementTree.parse(ASSET).getroot()
    _, _, _, has_bins, impratio = TASKS[task]
    root.find("option").set("impratio", repr(impratio))
    if not has_bins:
        worldbody, contact = root.find("worldbody"), root.find("contact")
        for geom in worldbody.findall("geom[@class='wall']"):
            worldbody.remove(geom)
        for pair in contact.findall("pair"):
            if pair.get("geom2").startswith("wall_"):
                contact.remove(pair)
    return mujoco.MjModel.from_xml_string(ElementTree.tostring(root, encoding="unicode"))


def _line_search_loop_until_all_done(cond_fun, body_fun, init_val, max_iter):
    """Stand-in for MJX 3.2.6's `solver._while_loop_scan`, the loop of its Newton line search.

    MJX runs that loop as a scan of `max_iter` (12) steps, each a `lax.cond` that skips the body
    once `cond_fun` is false. Vmapped over envs, a cond on a per-env flag becomes a select that
    computes the body anyway, so every env pays all 12 iterations. This while loop runs the body
    while `cond_fun` holds, at most `max_iter` times: the same iterations per env, hence the same
    numbers, and vmapped it stops as soon as every env's search is done. (Unlike the scan it is
    not reverse-mode differentiable; nothing here differentiates through the physics.)"""
    unconverged = True if _SOLVER_UNCONVERGED[-1] is None else _SOLVER_UNCONVERGED[-1]
    keep_going = lambda carry: cond_fun(carry[0]) & (carry[1] < max_iter) & unconverged
    return jax.lax.while_loop(keep_going, lambda carry: (body_fun(carry[0]), carry[1] + 1), (init_val, 0))[0]


# While a Newton iteration's line search is traced: whether the env's solve is still running.
_SOLVER_UNCONVERGED: list = [None]


def _line_search_of_unconverged_envs(m, d, ctx):
    """MJX's `solver._linesearch`, told whether this env's Newton solve has already stopped.

    Vmapped, MJX's Newton while loop runs its body for every env until the last one stops and
    keeps the result only for envs still iterating (a select). The envs that have stopped still
    run their line search, often all 12 iterations (their search direction is ~0, so no exit
    test passes), which holds the whole batch to 12. Their result is thrown away, so stopping
    their line search at once changes no number. `converged` is MJX's own stopping test of
    `solver.solve` (iterations, improvement, gradient), evaluated on the same context."""
    if m.opt.iterations == 1:  # MJX then runs one body without testing
        return _ORIGINAL_LINESEARCH(m, d, ctx)
    improvement = mjx_solver._rescale(m, ctx.prev_cost - ctx.cost)
    gradient = mjx_solver._rescale(m, mjx_math.norm(ctx.grad))
    converged = ctx.solver_niter >= m.opt.iterations
    converged |= improvement < m.opt.tolerance
    converged |= gradient < m.opt.tolerance
    _SOLVER_UNCONVERGED.append(~converged)
    try:
        return _ORIGINAL_LINESEARCH(m, d, ctx)
    finally:
        _SOLVER_UNCONVERGED.pop()


_ORIGINAL_LINESEARCH = mjx_solver._linesearch


@contextlib.contextmanager
def _line_search_as_while_loop():
    """While tracing inside this block, MJX's line search uses the two stand-ins above. It swaps
    the module attributes only for the duration of the trace, so other MJX users keep MJX's own."""
    original_loop, original_linesearch = mjx_solver._while_loop_scan, mjx_solver._linesearch
    mjx_solver._while_loop_scan = _line_search_loop_until_all_done
    mjx_solver._linesearch = _line_search_of_unconverged_envs
    try:
        yield
    finally:
        mjx_solver._while_loop_scan, mjx_solver._linesearch = original_loop, original_linesearch


_MJX_DATA_FIELDS = tuple(field.name for field in dataclasses.fields(mjx.Data))


def _to_mjx_data(pipeline_state: brax_mjx_base.State) -> mjx.Data:
    """The plain mjx.Data inside brax's MJX State (its contact without brax's two extra fields)."""
    contact = pipeline_state.contact
    contact_fields = {k: v for k, v in contact.__dict__.items() if k not in ("link_idx", "elasticity")}
    fields = {name: getattr(pipeline_state, name) for name in _MJX_DATA_FIELDS}
    return mjx.Data(**{**fields, "contact": mjx.Contact(**contact_fields)})


def _to_brax_state(sys, data: mjx.Data) -> brax_mjx_base.State:
    """brax's MJX State for `data`, built the way brax's `mjx.pipeline.step` builds it after each
    substep (q, qd, link transforms x, link velocities xd, contact with link ids)."""
    x = Transform(pos=data.xpos[1:], rot=data.xquat[1:])
    cvel = Motion(vel=data.cvel[1:, 3:], ang=data.cvel[1:, :3])
    offset = data.xpos[1:, :] - data.subtree_com[sys.body_rootid[1:]]
    xd = Transform.create(pos=offset).vmap().do(cvel)
    data = brax_mjx_pipeline._reformat_contact(sys, data)
    return brax_mjx_base.State(q=data.qpos, qd=data.qvel, x=x, xd=xd, **data.__dict__)


class ArmEnv(PipelineEnv):
    """One arm task; use the subclasses ArmPushEasy, ArmPushHard, ArmBinpickHard."""

    state_dim = 17
    goal_indices = (0, 1, 2)
    goal_reach_thresh = 0.1

    def __init__(self, *, task: str):
        if task not in TASKS:
            raise ValueError(f"unknown arm task {task!r}; valid: {', '.join(TASKS)}")
        super().__init__(sys=mjcf.load_model(load_model(task)), backend="mjx", n_frames=N_FRAMES)
        self.task = task
        cube_center, goal_center, self._noise, self.has_bins, _ = TASKS[task]
        self._cube_center = jnp.array(cube_center)
        self._goal_center = jnp.array([*goal_center, GOAL_Z])
        q = jnp.zeros(NQ).at[CUBE_Q + 3].set(1.0).at[MARKER_Q + 3].set(1.0)  # identity quats
        q = q.at[ARM_Q : ARM_Q + 7].set(jnp.array(ARM_START))
        self._init_q = q.at[FINGER_Q : FINGER_Q + 2].set(FINGER_START)

    @property
    def dt(self) -> float:
        return float(self.sys.opt.timestep) * self._n_frames

    @property
    def action_size(self) -> int:
        return 5

    @property
    def observation_size(self) -> int:
        return self.state_dim + len(self.goal_indices)

    def reset(self, rng: jax.Array) -> State:
        return self.reset_to(*self.sample_start(rng))

    def sample_start(self, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(q, qd, goal) of a reset: cube and goal uniform in their regions, drawn with the paper's
        key use (a key gives the same start and goal as in the paper's code); the arm at ARM_START,
        gripper open, everything at rest."""
        rng, key_state = jax.random.split(rng)
        _, key_goal, _ = jax.random.split(rng, 3)
        _, key_cube, _ = jax.random.split(key_state, 3)
        _, key_goal = jax.random.split(key_goal)
        cube_xy = self._cube_center + self._noise * jax.random.uniform(key_cube, (2,), minval=-1.0, maxval=1.0)
        goal_offset = jax.random.uniform(key_goal, (3,), minval=-1.0, maxval=1.0)
        goal = self._goal_center + jnp.array([self._noise, self._noise, 0.0]) * goal_offset
        q = self._init_q.at[CUBE_Q : CUBE_Q + 3].set(jnp.array([cube_xy[0], cube_xy[1], CUBE_START_Z]))
        return q, jnp.zeros(NV), goal

    def reset_to(self, q: jax.Array, qd: jax.Array, goal: jax.Array) -> State:
        """The state a reset gives with physical state (q [23], qd [21]) and goal [3]; the goal
        marker (q[7:10]) is moved to the goal."""
        q = jnp.asarray(q, jnp.float32).at[MARKER_Q : MARKER_Q + 3].set(goal)
        pipeline_state = self.pipeline_init(q, jnp.asarray(qd, jnp.float32))
        obs = self._observe(pipeline_state, jnp.asarray(goal, jnp.float32))
        zero = jnp.zeros(())
        return State(pipeline_state, obs, zero, zero, self._metrics(obs))

    def step(self, state: State, action: jax.Array) -> State:
        pipeline_state = self.pipeline_step(state.pipeline_state, self._control(action))
        obs = self._observe(pipeline_state, state.obs[self.state_dim :])
        metrics = self._metrics(obs)
        state.metrics.update(metrics)
        return state.replace(pipeline_state=pipeline_state, obs=obs, reward=metrics["success"])

    def pipeline_step(self, pipeline_state: brax_mjx_base.State, action: jax.Array) -> brax_mjx_base.State:
        """N_FRAMES substeps of `mjx.step` with the controls held: brax's `pipeline_step`, less two
        costs that change no number. brax rebuilds its State (x, xd, contact link ids) after every
        substep; only the last one is read, so it is built once. And MJX's line search runs as a
        while loop that stops once every env still solving is done (see `_line_search_as_while_loop`),
        which skips iterations vmapped envs would otherwise compute and discard.
        `PipelineEnv.pipeline_step(env, ...)` is brax's path (bench/envs.py --compare-brax-step
        times both)."""
        data = _to_mjx_data(pipeline_state).replace(ctrl=action)
        with _line_search_as_while_loop():
            data = jax.lax.scan(lambda d, _: (mjx.step(self.sys, d), None), data, (), self._n_frames)[0]
        return _to_brax_state(self.sys, data)

    def _control(self, action: jax.Array) -> jax.Array:
        """Actions -> the 9 actuator controls (joints 1-7, both fingers), held for all substeps."""
        action = jnp.clip(action, -1.0, 1.0)
        targets = jnp.array(CTRL_OFFSET) + action[:4] * jnp.array(CTRL_HALF_RANGE)
        finger = jnp.where(action[4] > 0, 0.0, FINGER_CTRL_OPEN)
        return jnp.array([targets[0], targets[1], HELD[0], targets[2], HELD[1], targets[3], HELD[2], finger, finger])

    def _observe(self, pipeline_state, goal: jax.Array) -> jax.Array:
        q, x = pipeline_state.q, pipeline_state.x
        fingers = jnp.linalg.norm(x.pos[LEFT_FINGER] - x.pos[RIGHT_FINGER])
        return jnp.concatenate(
            [
                q[CUBE_Q : CUBE_Q + 3],
                q[ARM_Q : ARM_Q + 7],
                x.pos[LINK7],
                pipeline_state.xd.vel[LINK7],
                fingers[None],
                goal,
            ]
        )

    def _metrics(self, obs: jax.Array) -> dict[str, jax.Array]:
        dist = jnp.linalg.norm(obs[0:3] - obs[self.state_dim :])
        return {
            "success": (dist < self.goal_reach_thresh).astype(jnp.float32),
            "dist": dist,
            "success_easy": (dist < 0.3).astype(jnp.float32),
            "success_hard": (dist < 0.03).astype(jnp.float32),
        }


class ArmPushEasy(ArmEnv):
    """Push the cube a short way (goals within 0.1 of (0.1, 0.6))."""

    def __init__(self):
        super().__init__(task="push_easy")


class ArmPushHard(ArmEnv):
    """Push the cube across a 1 m x 0.5 m workspace (goals within 0.25 of (0.25, 0.65))."""

    def __init__(self):
        super().__init__(task="push_hard")


class ArmBinpickHard(ArmEnv):
    """Carry the cube from one bin into the other (goals within 0.15 of (0.3, 0.6))."""

    def __init__(self):
        super().__init__(task="binpick_hard")
