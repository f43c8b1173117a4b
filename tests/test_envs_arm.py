"""Arm envs (envs/arm.py): sizes, action mapping, resets, random rollouts, and a scripted
controller that solves arm_push_easy (the proof that the task is solvable).

MJX on CPU compiles slowly (tens of seconds per step function), so each env's batched reset and
step are compiled once per module and shared; push_easy and push_hard share one model, so their
step functions share one compiled program through the persistent compilation cache.
"""
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

import envs
from envs import arm

ARM_IDS = ("arm_push_easy", "arm_push_hard", "arm_binpick_hard")
NUM_ENVS = 4  # one batch size everywhere: each env's step compiles once
RANDOM_STEPS = 100


class Compiled:
    """One env with its jitted batched reset/step, built on first use and kept for the module."""

    def __init__(self, env_id):
        self.env = envs.make(env_id)
        self.reset = jax.jit(jax.vmap(self.env.reset))
        self.step = jax.jit(jax.vmap(self.env.step))


_CACHE = {}


def compiled(env_id) -> Compiled:
    if env_id not in _CACHE:
        _CACHE[env_id] = Compiled(env_id)
    return _CACHE[env_id]


def _keys(seed, n=NUM_ENVS):
    return jax.random.split(jax.random.PRNGKey(seed), n)


# --------------------------------------------------------------------------------------------
# Static facts (no MJX compilation)


@pytest.mark.parametrize("env_id", ARM_IDS)
def test_sizes_and_timestep(env_id):
    env = compiled(env_id).env
    assert env.state_dim == 17 and env.goal_indices == (0, 1, 2)
    assert env.observation_size == 20 and env.action_size == 5
    assert env.goal_reach_thresh == 0.1
    assert env.backend == "mjx"
    assert env.dt == pytest.approx(0.05)  # 25 substeps of 0.002 s
    assert float(env.sys.opt.timestep) == pytest.approx(0.002)
    assert int(env.sys.opt.iterations) == 6 and int(env.sys.opt.ls_iterations) == 12


def test_options_are_rejected_by_name():
    with pytest.raises(TypeError, match="backend"):
        envs.make("arm_push_easy", backend="spring")
    with pytest.raises(ValueError, match="push_medium"):
        arm.ArmEnv(task="push_medium")


def test_model_is_loaded_unchanged():
    """brax's System holds the compiled model's body frames (only the cube's free-joint frame is
    cleared by brax, as MuJoCo ignores it); a joint-less body before the cube would break this."""
    env = compiled("arm_binpick_hard").env
    model = arm.load_model("binpick_hard")
    moved = np.abs(np.asarray(env.sys.body_pos) - model.body_pos).max(axis=1) > 1e-6
    assert [model.body(i).name for i in np.nonzero(moved)[0]] == ["cube"]
    assert model.nmocap == 1


def test_push_model_has_no_bin_and_assets_do_not_depend_on_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyError):
        arm.load_model("push_hard").body("bin")
    assert arm.load_model("binpick_hard").body("bin").id > 0


def test_action_mapping_by_hand():
    env = compiled("arm_push_easy").env
    low = np.asarray(env._control(jnp.array([-1.0, -1.0, -1.0, -1.0, 1.0])))
    np.testing.assert_allclose(low, [0.3491, 0.0, 0.0, -3.0718, 0.0, 2.3562, 1.4487, 0.0, 0.0], atol=1e-6)
    high = np.asarray(env._control(jnp.array([1.0, 1.0, 1.0, 1.0, -0.5])))
    np.testing.assert_allclose(high, [2.7925, 1.48353, 0.0, -0.0698, 0.0, 3.7525, 1.4487, 0.04, 0.04], atol=1e-6)
    # 0 -> the middle of each range; a gripper action of exactly 0 opens (only > 0 closes).
    mid = np.asarray(env._control(jnp.zeros(5)))
    np.testing.assert_allclose(mid[[0, 1, 3, 5]], [1.5708, 0.741765, -1.5708, 3.05435], atol=1e-5)
    np.testing.assert_allclose(mid[7:], [0.04, 0.04])
    clipped = np.asarray(env._control(jnp.array([3.0, -7.0, 0.0, 0.0, 0.0])))
    np.testing.assert_allclose(clipped[:2], [2.7925, 0.0], atol=1e-6)


def test_success_metrics_by_distance():
    env = compiled("arm_push_easy").env
    goal = np.array([0.1, 0.6, 0.03])
    for offset, success, easy, hard in [(0.0, 1, 1, 1), (0.02, 1, 1, 1), (0.05, 1, 1, 0),
                                        (0.2, 0, 1, 0), (0.5, 0, 0, 0)]:
        obs = np.zeros(20)
        obs[0:3] = goal + np.array([offset, 0.0, 0.0])
        obs[17:20] = goal
        metrics = env._metrics(jnp.asarray(obs))
        assert float(metrics["dist"]) == pytest.approx(offset, abs=1e-6)
        assert (float(metrics["success"]), float(metrics["success_easy"]), float(metrics["success_hard"])) == (success, easy, hard)


def test_inverse_kinematics_matches_the_model_and_reach_table():
    """Points inside the REACH table are reached exactly, gripper down, within the action ranges."""
    model = arm.load_model("push_easy")
    data = mujoco.MjData(model)
    ee_site = model.site("ee").id
    points = []
    for height, r_min, r_max in zip(arm.REACH_Z, arm.REACH_MIN, arm.REACH_MAX):
        for radius in np.linspace(r_min, r_max, 4):
            for azimuth in (0.45, 1.571, 2.6):
                points.append([radius * np.cos(azimuth), radius * np.sin(azimuth), height])
    points = np.array(points)
    targets = np.asarray(jax.vmap(arm.inverse_kinematics)(jnp.asarray(points)))
    assert np.all(targets >= np.array(arm.TARGET_LOW) - 1e-4)
    assert np.all(targets <= np.array(arm.TARGET_HIGH) + 1e-4)
    for point, (q1, q2, q4, q6) in zip(points, targets):
        data.qpos[:7] = [q1, q2, 0.0, q4, 0.0, q6, arm.HELD[2]]
        mujoco.mj_kinematics(model, data)
        np.testing.assert_allclose(data.site_xpos[ee_site], point, atol=1e-4)
        tool_axis = data.site_xmat[ee_site].reshape(3, 3)[:, 2]
        np.testing.assert_allclose(tool_axis, [0.0, 0.0, -1.0], atol=1e-4)


# --------------------------------------------------------------------------------------------
# Reset and random rollouts (MJX)


@pytest.mark.parametrize("env_id", ARM_IDS)
def test_reset_draws_goal_and_cube_in_their_regions(env_id):
    c = compiled(env_id)
    (goal_x, goal_y), goal_noise, cube_noise, has_bin = arm.TASKS[env_id.removeprefix("arm_")]
    state = c.reset(_keys(0))
    obs = np.asarray(state.obs)
    goal, cube = obs[:, 17:20], obs[:, 0:3]
    assert np.all(np.abs(goal[:, 0] - goal_x) <= goal_noise) and np.all(np.abs(goal[:, 1] - goal_y) <= goal_noise)
    assert np.all(np.abs(cube[:, 0] + goal_x) <= cube_noise) and np.all(np.abs(cube[:, 1] - goal_y) <= cube_noise)
    np.testing.assert_allclose(goal[:, 2], 0.03, atol=1e-6)
    np.testing.assert_allclose(cube[:, 2], 0.03, atol=1e-3)
    assert len(np.unique(np.round(goal, 6), axis=0)) == NUM_ENVS  # every key its own goal
    np.testing.assert_allclose(obs[:, 3:10], np.tile(arm.ARM_START, (NUM_ENVS, 1)), atol=1e-5)
    np.testing.assert_allclose(obs[:, 16], 0.08, atol=1e-5)  # fingers open
    np.testing.assert_allclose(np.asarray(state.pipeline_state.mocap_pos[:, 0]), goal)  # the marker
    # the kinematics-only start state agrees with MuJoCo's own forward kinematics; at rest
    model = arm.load_model(env_id.removeprefix("arm_"))
    data = mujoco.MjData(model)
    data.qpos[:] = np.asarray(state.pipeline_state.q[0])
    mujoco.mj_kinematics(model, data)
    np.testing.assert_allclose(obs[0, 10:13], data.site_xpos[model.site("ee").id], atol=1e-5)
    np.testing.assert_allclose(obs[:, 13:16], 0.0)
    if has_bin:  # the rim's inner edge is 0.18 from the bin centre: every goal cube fits inside
        assert np.all(np.abs(goal[:, :2] - np.array([goal_x, goal_y])) + arm.CUBE_HALF < 0.18)
    # the same key gives the same draw
    again = np.asarray(c.reset(_keys(0)).obs)
    np.testing.assert_array_equal(again, obs)
    other = np.asarray(c.reset(_keys(1)).obs)
    assert not np.allclose(other[:, 17:20], goal)


@pytest.mark.parametrize("env_id", ARM_IDS)
def test_random_actions_stay_finite_and_never_terminate(env_id):
    c = compiled(env_id)
    state = c.reset(_keys(2))
    actions = jax.random.uniform(jax.random.PRNGKey(3), (RANDOM_STEPS, NUM_ENVS, 5), minval=-1, maxval=1)
    cube_z, held = [], []
    for action in actions:
        state = c.step(state, action)
        obs = np.asarray(state.obs)
        assert np.all(np.isfinite(obs)), f"non-finite observation in {env_id}"
        assert not np.any(np.asarray(state.done))
        cube_z.append(obs[:, 2])
        held.append(obs[:, [5, 7, 9]])
    for name in ("success", "dist", "success_easy", "success_hard"):
        assert state.metrics[name].shape == (NUM_ENVS,)
    np.testing.assert_allclose(np.asarray(state.metrics["dist"]),
                               np.linalg.norm(obs[:, 0:3] - obs[:, 17:20], axis=1), rtol=1e-5)
    assert np.min(cube_z) > 0.0  # the cube never falls through the table
    # joints 3, 5, 7 stay near their held targets under random commands to the others
    np.testing.assert_allclose(np.array(held), np.broadcast_to([0.0, 0.0, 1.4487], np.shape(held)), atol=0.1)


def test_commanded_pose_is_reached_within_a_few_steps():
    """Position control: holding an action moves the end effector to the inverse-kinematics point."""
    c = compiled("arm_push_easy")
    state = c.reset(_keys(4))
    target = jnp.array([0.0, 0.8, 0.3])
    action = arm.joint_targets_to_action(arm.inverse_kinematics(target), jnp.array(False))
    for _ in range(10):
        state = c.step(state, jnp.tile(action, (NUM_ENVS, 1)))
    np.testing.assert_allclose(np.asarray(state.obs[:, 10:13]), np.tile(target, (NUM_ENVS, 1)), atol=0.01)
    np.testing.assert_allclose(np.asarray(state.obs[:, 13:16]), 0.0, atol=0.05)  # at rest


def test_scripted_controller_solves_push_easy():
    """8 episodes (two batches of 4), 80 steps (4 s) each: at least 6 end with the cube at the goal."""
    c = compiled("arm_push_easy")
    policy = jax.jit(jax.vmap(lambda obs: arm.scripted_action(c.env, obs)))
    final, start_dist = [], []
    for seed in (5, 6):
        state = c.reset(_keys(seed))
        start_dist.append(np.asarray(state.metrics["dist"]))
        for _ in range(80):
            state = c.step(state, policy(state.obs))
        final.append(np.asarray(state.metrics["success"]))
    final, start_dist = np.concatenate(final), np.concatenate(start_dist)
    assert final.sum() >= 6, (final, start_dist)
    assert np.mean(start_dist > 0.1) >= 0.5  # most episodes start away from the goal
