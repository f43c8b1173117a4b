"""Arm envs (envs/arm.py, envs/assets/arm.xml): the model is the paper's fused model (layout,
joints, masses, contacts, actuators, options), the action map, the reset draws (the paper's key
use), reset_to, and short MJX rollouts (finite, gripper, the paper's actuator set-points).
Trajectory-level agreement with the paper's code is tests/test_envs_golden.py's job.

MJX on CPU compiles slowly, so only arm_push_easy's reset_to and step are compiled here (once per
module, for one batch size; `reset` is `reset_to(*sample_start(key))`); the other two tasks are
checked through their models and start draws.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

import envs
from envs import arm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARM_IDS = ("arm_push_easy", "arm_push_hard", "arm_binpick_hard")
NUM_ENVS = 4

# The paper's code, reset with jax.random.PRNGKey(0): cube xy and goal (x, y, z).
PAPER_DRAW_KEY0 = {
    "arm_push_easy": ((-0.11517785, 0.60827184), (0.18747953, 0.62410462, 0.03)),
    "arm_push_hard": ((-0.28794461, 0.67067957), (0.46869880, 0.71026140, 0.03)),
    "arm_binpick_hard": ((-0.32276678, 0.61240780), (0.43121931, 0.63615686, 0.03)),
}
# The paper's model at the start pose: link7 origin and the two finger body origins.
START_LINK7 = (-0.000138, 0.678043, 0.370831)
START_FINGERS = ((0.031354, 0.771521, 0.232169), (-0.031676, 0.807864, 0.265432))


@pytest.fixture(scope="module")
def push_easy():
    env = envs.make("arm_push_easy")
    return env, jax.jit(jax.vmap(env.reset_to)), jax.jit(jax.vmap(env.step))


def _keys(seed, n=NUM_ENVS):
    return jax.random.split(jax.random.PRNGKey(seed), n)


# --------------------------------------------------------------------------------------------
# The model (plain MuJoCo, no MJX compilation)


@pytest.mark.parametrize("env_id", ARM_IDS)
def test_sizes_and_options(env_id):
    env = envs.make(env_id)
    assert env.state_dim == 17 and env.goal_indices == (0, 1, 2)
    assert env.observation_size == 20 and env.action_size == 5
    assert env.goal_reach_thresh == 0.1 and env.backend == "mjx"
    assert env.dt == pytest.approx(0.05)  # 25 substeps of 0.002 s
    opt = env.sys.mj_model.opt
    assert opt.timestep == pytest.approx(0.002) and opt.integrator == mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    assert (opt.iterations, opt.ls_iterations) == (6, 12) and opt.solver == mujoco.mjtSolver.mjSOL_NEWTON
    assert opt.cone == mujoco.mjtCone.mjCONE_PYRAMIDAL
    assert opt.impratio == (10.0 if env_id == "arm_binpick_hard" else 1.0)
    assert (env.sys.mj_model.nq, env.sys.mj_model.nv, env.sys.mj_model.nu) == (23, 21, 9)


def test_options_and_tasks_are_rejected_by_name():
    with pytest.raises(TypeError, match="backend"):
        envs.make("arm_push_easy", backend="spring")
    with pytest.raises(ValueError, match="push_medium"):
        arm.ArmEnv(task="push_medium")


@pytest.mark.parametrize("task", ["push_easy", "binpick_hard"])
def test_model_is_the_papers_fused_model(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the asset path does not depend on the working directory
    m = arm.load_model(task)
    qpos_adr = {m.joint(j).name: int(m.jnt_qposadr[j]) for j in range(m.njnt)}
    assert qpos_adr == {
        "cube": 0,
        "goal_marker": 7,
        **{f"joint{i}": 13 + i for i in range(1, 8)},
        "finger_joint1": 21,
        "finger_joint2": 22,
    }
    assert [m.body(b).name for b in range(m.nbody)] == [
        "world",
        "cube",
        "goal_marker",
        *[f"link{i}" for i in range(1, 8)],
        "left_finger",
        "right_finger",
    ]
    # joints: no damping/armature on the arm, only joints 2, 4, 6 and the fingers limited
    np.testing.assert_array_equal(m.dof_damping, [0.0] * 19 + [5.0, 5.0])
    np.testing.assert_allclose(m.dof_armature, [0.0] * 19 + [0.1, 0.1])
    limited = [m.joint(j).name for j in range(m.njnt) if m.jnt_limited[j]]
    assert limited == ["joint2", "joint4", "joint6", "finger_joint1", "finger_joint2"]
    np.testing.assert_allclose(m.jnt_range[[3, 5, 7]], [[-1.7628, 1.7628], [-3.0718, -0.0698], [-0.0175, 3.7525]])
    # masses: link7 carries no hand mass; cube and marker 0.216 kg; the marker's gravity cancelled
    np.testing.assert_allclose(
        m.body_mass[1:],
        [0.216, 0.216, 4.970684, 0.646926, 3.228604, 3.587895, 1.225946, 1.666555, 0.735522, 0.015, 0.015],
        rtol=1e-6,
    )
    np.testing.assert_allclose(m.body_inertia[3], [0.707137, 0.703435, 0.008525], atol=2e-6)
    assert list(m.body_gravcomp) == [0, 0, 1] + [0] * 9
    # contacts only through explicit pairs, all with the pair defaults (mu 1, condim 3)
    assert not m.geom_contype.any() and not m.geom_conaffinity.any()
    assert m.npair == (40 if task == "binpick_hard" else 8)
    np.testing.assert_allclose(m.pair_friction, np.tile([1.0, 1.0, 0.005, 0.0001, 0.0001], (m.npair, 1)))
    assert set(m.pair_dim) == {3} and not m.pair_margin.any() and not m.pair_gap.any()
    pairs = {frozenset((m.geom(int(a)).name, m.geom(int(b)).name)) for a, b in zip(m.pair_geom1, m.pair_geom2)}
    assert frozenset(("left_finger", "right_finger")) in pairs and frozenset(("cube", "hand")) in pairs
    assert (frozenset(("hand", "wall_b3")) in pairs) == (task == "binpick_hard")
    # actuators: the paper's gains, including joints 3-7 whose bias exceeds their gain
    np.testing.assert_allclose(m.actuator_gainprm[:, 0], [4500, 4500, 2000, 2000, 1000, 1000, 1000, 0.15686, 0.15686])
    np.testing.assert_allclose(m.actuator_biasprm[:, 1], [-4500, -4500, -3500, -3500, -2000, -2000, -2000, -500, -500])
    np.testing.assert_allclose(m.actuator_forcerange[:, 1], [87] * 4 + [12] * 3 + [500] * 2)
    np.testing.assert_allclose(m.actuator_ctrlrange[7], [0, 255])
    # the fingers are coupled
    assert m.neq == 1 and m.eq_type[0] == mujoco.mjtEq.mjEQ_JOINT
    # kinematics at the start pose
    data = mujoco.MjData(m)
    data.qpos[14:21], data.qpos[21:23] = arm.ARM_START, arm.FINGER_START
    mujoco.mj_kinematics(m, data)
    np.testing.assert_allclose(data.xpos[arm.LINK7 + 1], START_LINK7, atol=2e-6)
    np.testing.assert_allclose(data.xpos[[arm.LEFT_FINGER + 1, arm.RIGHT_FINGER + 1]], START_FINGERS, atol=2e-6)


def test_push_tasks_share_one_model():
    """Same arrays -> the same compiled step program for arm_push_easy and arm_push_hard."""
    easy, hard = arm.load_model("push_easy"), arm.load_model("push_hard")
    for field in ("body_pos", "body_quat", "geom_size", "pair_geom1", "actuator_gainprm", "qpos0"):
        np.testing.assert_array_equal(getattr(easy, field), getattr(hard, field))


def test_action_mapping_by_hand():
    env = envs.make("arm_push_easy")
    low = np.asarray(env._control(jnp.array([-1.0, -1.0, -1.0, -1.0, 1.0])))
    np.testing.assert_allclose(low, [0.3491, 0.0, 0.0, -3.0718, 0.0, 2.3562, 1.4487, 0.0, 0.0], atol=1e-6)
    high = np.asarray(env._control(jnp.array([1.0, 1.0, 1.0, 1.0, -0.5])))
    np.testing.assert_allclose(high, [2.7925, 1.48353, 0.0, -0.0698, 0.0, 3.7525, 1.4487, 255, 255], atol=1e-5)
    # 0 -> the middle of each range; a gripper action of exactly 0 opens (only > 0 closes).
    mid = np.asarray(env._control(jnp.zeros(5)))
    np.testing.assert_allclose(mid[[0, 1, 3, 5]], [1.5708, 0.741765, -1.5708, 3.05435], atol=1e-6)
    np.testing.assert_allclose(mid[7:], [255, 255])
    clipped = np.asarray(env._control(jnp.array([3.0, -7.0, 0.0, 0.0, 0.0])))
    np.testing.assert_allclose(clipped[:2], [2.7925, 0.0], atol=1e-6)


def test_success_metrics_by_distance():
    env = envs.make("arm_push_easy")
    goal = np.array([0.1, 0.6, 0.03])
    for offset, success, easy, hard in [
        (0.0, 1, 1, 1),
        (0.02, 1, 1, 1),
        (0.05, 1, 1, 0),
        (0.2, 0, 1, 0),
        (0.5, 0, 0, 0),
    ]:
        obs = np.zeros(20)
        obs[0:3] = goal + np.array([offset, 0.0, 0.0])
        obs[17:20] = goal
        metrics = env._metrics(jnp.asarray(obs))
        assert float(metrics["dist"]) == pytest.approx(offset, abs=1e-6)
        assert (float(metrics["success"]), float(metrics["success_easy"]), float(metrics["success_hard"])) == (
            success,
            easy,
            hard,
        )


@pytest.mark.parametrize("env_id", ARM_IDS)
def test_start_draws_are_the_papers_and_stay_in_their_regions(env_id):
    env = envs.make(env_id)
    (cube_x, cube_y), (goal_x, goal_y), noise, _, _ = arm.TASKS[env_id.removeprefix("arm_")]
    q, qd, goal = jax.vmap(env.sample_start)(_keys(0, 256))
    q, qd, goal = np.asarray(q), np.asarray(qd), np.asarray(goal)
    assert q.shape == (256, 23) and qd.shape == (256, 21) and not qd.any()
    assert np.all(np.abs(q[:, 0] - cube_x) <= noise) and np.all(np.abs(q[:, 1] - cube_y) <= noise)
    assert np.all(np.abs(goal[:, 0] - goal_x) <= noise) and np.all(np.abs(goal[:, 1] - goal_y) <= noise)
    assert np.abs(q[:, 0] - cube_x).max() > 0.9 * noise  # the whole region is used
    np.testing.assert_allclose(q[:, 2], 0.07)  # 4 cm above the table
    np.testing.assert_allclose(goal[:, 2], 0.03)
    np.testing.assert_allclose(q[:, 3:7], np.tile([1.0, 0, 0, 0], (256, 1)))
    np.testing.assert_allclose(q[:, 14:23], np.tile([*arm.ARM_START, 0.04, 0.04], (256, 1)))
    assert len(np.unique(goal.round(6), axis=0)) == 256  # every key its own goal
    # the paper's code draws the same start and goal from the same key
    q0, _, goal0 = env.sample_start(jax.random.PRNGKey(0))
    cube_xy, paper_goal = PAPER_DRAW_KEY0[env_id]
    np.testing.assert_allclose(np.asarray(q0[:2]), cube_xy, atol=1e-6)
    np.testing.assert_allclose(np.asarray(goal0), paper_goal, atol=1e-6)


# --------------------------------------------------------------------------------------------
# MJX: reset, reset_to and rollouts (arm_push_easy)


def test_reset_observation_and_reset_to(push_easy):
    env, reset_to, _ = push_easy
    q, qd, goal = jax.vmap(env.sample_start)(_keys(1))
    state = reset_to(q, qd, goal)
    obs = np.asarray(state.obs)
    np.testing.assert_array_equal(obs[:, 0:3], np.asarray(q[:, 0:3]))
    np.testing.assert_allclose(obs[:, 3:10], np.tile(arm.ARM_START, (NUM_ENVS, 1)), atol=1e-6)
    np.testing.assert_allclose(obs[:, 10:13], np.tile(START_LINK7, (NUM_ENVS, 1)), atol=2e-6)
    np.testing.assert_array_equal(obs[:, 13:16], 0.0)  # at rest
    np.testing.assert_allclose(obs[:, 16], 0.08, atol=1e-6)  # fingers open
    np.testing.assert_array_equal(obs[:, 17:20], np.asarray(goal))
    np.testing.assert_array_equal(np.asarray(state.pipeline_state.q[:, 7:10]), np.asarray(goal))  # marker at goal
    np.testing.assert_allclose(
        np.asarray(state.metrics["dist"]), np.linalg.norm(obs[:, 0:3] - obs[:, 17:20], axis=1), rtol=1e-6
    )
    # from another state and goal it starts there
    moved_q = q.at[:, 14].set(1.2).at[:, 0].add(0.05)
    moved_qd = qd.at[:, 12].set(0.5)
    moved = reset_to(moved_q, moved_qd, goal + 0.01)
    np.testing.assert_allclose(np.asarray(moved.obs[:, 3]), 1.2)
    np.testing.assert_allclose(np.asarray(moved.obs[:, 0]), np.asarray(q[:, 0]) + 0.05)
    np.testing.assert_allclose(np.asarray(moved.obs[:, 17:20]), np.asarray(goal) + 0.01)
    np.testing.assert_array_equal(np.asarray(moved.pipeline_state.qd), np.asarray(moved_qd))
    # joint 1 turning at 0.5 rad/s: link7's origin moves horizontally, perpendicular to its radius
    link7, link7_vel = np.asarray(moved.obs[:, 10:13]), np.asarray(moved.obs[:, 13:16])
    np.testing.assert_allclose(link7_vel[:, :2], 0.5 * np.stack([-link7[:, 1], link7[:, 0]], axis=1), atol=1e-5)
    np.testing.assert_allclose(link7_vel[:, 2], 0.0, atol=1e-6)


@pytest.mark.slow  # CI time (27 s); the arm physics is pinned in CI by tests/test_envs_golden.py
def test_rollouts_are_finite_grip_and_settle_at_the_papers_setpoints(push_easy):
    """Random actions (finite, no termination, cube on the table), then a held zero action with the
    gripper closed: joints 3-7 settle at their actuators' set-points, about half the target
    (joint 7: 1.4487 / 2), the fingers close; then they open fully (0.08 each, 0.16 apart)."""
    env, reset_to, step = push_easy
    state = reset_to(*jax.vmap(env.sample_start)(_keys(2)))
    goal = np.asarray(state.obs[:, 17:20])
    actions = jax.random.uniform(jax.random.PRNGKey(3), (30, NUM_ENVS, 5), minval=-1, maxval=1)
    for action in actions:
        state = step(state, action)
        obs = np.asarray(state.obs)
        assert np.all(np.isfinite(obs)) and not np.any(np.asarray(state.done))
        assert np.all(obs[:, 2] > 0.02)  # the cube never sinks into the table
    np.testing.assert_array_equal(obs[:, 17:20], goal)  # the goal is kept
    np.testing.assert_allclose(np.asarray(state.metrics["dist"]), np.linalg.norm(obs[:, 0:3] - goal, axis=1), rtol=1e-5)
    assert np.asarray(state.reward).tolist() == np.asarray(state.metrics["success"]).tolist()
    close = jnp.tile(jnp.array([0.0, 0.0, 0.0, 0.0, 1.0]), (NUM_ENVS, 1))
    for _ in range(40):
        state = step(state, close)
    obs = np.asarray(state.obs)
    np.testing.assert_allclose(obs[:, 9], 1.4487 / 2, atol=0.02)  # joint 7: gain 1000, bias 2000
    np.testing.assert_allclose(obs[:, [5, 7]], 0.0, atol=0.05)  # joints 3 and 5 held at 0
    assert np.all(obs[:, 6] > -1.5708 * 2000 / 3500 - 0.1) and np.all(obs[:, 6] < -0.5)  # joint 4
    np.testing.assert_allclose(obs[:, 13:16], 0.0, atol=0.02)  # at rest
    assert np.all(obs[:, 16] < 0.01)  # closed
    np.testing.assert_allclose(obs[:, 2], 0.03, atol=2e-3)  # the cube rests on the table
    for _ in range(10):
        state = step(state, -close)
    np.testing.assert_allclose(np.asarray(state.obs[:, 16]), 0.16, atol=2e-3)  # open


# --------------------------------------------------------------------------------------------
# The fast step (ArmEnv.pipeline_step) computes exactly what brax's pipeline_step computes


def test_line_search_loop_matches_mjx_scan_under_vmap():
    """The while loop that replaces MJX's line-search scan runs the same iterations per env: body
    while cond holds, at most max_iter times; vmapped, each env keeps its own count."""
    from mujoco.mjx._src import solver as mjx_solver

    def cond(carry):
        return carry[0] < carry[1]

    def body(carry):
        return carry[0] * 1.5 + 1.0, carry[1]

    starts = jnp.array([0.0, 0.0, 5.0, 0.0, 100.0])
    limits = jnp.array([1.0, 50.0, 4.0, 1e9, 200.0])  # done after 1, 7, 0, max_iter=12, 2 bodies
    for loop in (mjx_solver._while_loop_scan, arm._line_search_loop_until_all_done):
        out = jax.jit(jax.vmap(lambda s, lim, loop=loop: loop(cond, body, (s, lim), 12)[0]))(starts, limits)
        expected = []
        for s, lim in zip(starts.tolist(), limits.tolist()):
            for _ in range(12):
                if s >= lim:
                    break
                s = s * 1.5 + 1.0
            expected.append(s)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)


@pytest.mark.slow
def test_fast_step_equals_brax_pipeline_step(push_easy):
    """ArmEnv.pipeline_step (substeps run directly, while-loop line search) against brax's
    PipelineEnv.pipeline_step, vmapped, 4 random steps from a reset: the same states. Measured:
    bit-identical at XLA's default optimisation; at the tests' level 0 (conftest.py) up to 2e-6 in
    qvel and 8e-6 in contact forces by step 3, then 9e-5 in an observation at step 4, as much as
    brax's own path differs from itself unvmapped there, so the comparison stops at step 3."""
    from brax.envs.base import PipelineEnv

    env, reset_to, step = push_easy
    brax_env = envs.make("arm_push_easy")
    brax_env.pipeline_step = lambda pipeline_state, action: PipelineEnv.pipeline_step(brax_env, pipeline_state, action)
    brax_step = jax.jit(jax.vmap(brax_env.step))
    ours = theirs = reset_to(*jax.vmap(env.sample_start)(_keys(4)))
    actions = jax.random.uniform(jax.random.PRNGKey(5), (4, NUM_ENVS, 5), minval=-1, maxval=1)
    for action in actions:
        ours, theirs = step(ours, action), brax_step(theirs, action)
        np.testing.assert_allclose(np.asarray(ours.obs), np.asarray(theirs.obs), rtol=0, atol=1e-6)
        # the solver's outputs (contact forces split over near-degenerate rows) carry more rounding
        for name, tol in [("qpos", 1e-6), ("qvel", 1e-6), ("qacc_warmstart", 1e-4), ("efc_force", 1e-4)]:
            a, b = np.asarray(getattr(ours.pipeline_state, name)), np.asarray(getattr(theirs.pipeline_state, name))
            np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, np.abs(b).max()), err_msg=name)
        for a, b in [
            (ours.pipeline_state.x.pos, theirs.pipeline_state.x.pos),
            (ours.pipeline_state.xd.vel, theirs.pipeline_state.xd.vel),
        ]:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(
            np.asarray(ours.pipeline_state.contact.link_idx[1]), np.asarray(theirs.pipeline_state.contact.link_idx[1])
        )


FLOAT64_MAX_CAST = """
import json, warnings, jax, jax.numpy as jnp
{imports}
where_inf = jax.jit(lambda x: jnp.where(jnp.isinf(x), jnp.finfo(float).max, x))  # MJX's collision pattern
with warnings.catch_warnings(record=True) as caught:
    out = where_inf(jnp.array([1.0, jnp.inf, 2.0]))
    warnings.warn("overflow encountered in cast", RuntimeWarning, stacklevel=1)  # the same text from elsewhere
print(json.dumps({{"messages": [str(w.message) for w in caught], "out": out.tolist()}}))
"""


@pytest.mark.parametrize("imports, shown", [("", 2), ("import envs.arm", 1)])
def test_the_float64_max_cast_of_mjx_collision_is_silenced_by_envs_arm_and_nothing_else(imports, shown):
    """MJX writes the float64 maximum into float32 distances (+inf once cast) and numpy warns at every compile
    of an arm step; importing envs.arm silences that warning from jax's constant cast only. A fresh process,
    since pytest installs its own warning filters in front of the module's."""
    code = FLOAT64_MAX_CAST.format(imports=imports)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["messages"] == ["overflow encountered in cast"] * shown
    assert result["out"] == [1.0, float("inf"), 2.0]  # the values are what MJX means
