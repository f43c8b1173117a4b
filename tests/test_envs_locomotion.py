"""Locomotion envs (reacher, ant, humanoid, their mazes): sizes, physics timestep, goals, walls.

Expected values come from the paper's code (its layouts are re-typed here, so a typo in
envs/maze.py shows up), not from the code under test. Compilation dominates the run time (10-40 s
per env on 2 loaded cores), so physics is compiled for one env per code path (PHYSICS_IDS: reacher,
ant, humanoid and one maze per robot) and shared between tests; the other maze ids differ only in
data (walls, start/goal cells), checked without compiling: every id's walls against the paper's
layout, its goal draws, and that its physics equals its training layout's where they share walls.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs.maze import sample_start_goal

N = 4  # parallel envs in every batched call (one compiled shape per env)
LOCO_IDS = [i for i in envs.ENV_IDS if not i.startswith("arm_")]
G = 9.81

# id -> state_dim, goal slice, action size, success radius, control dt (the paper's code)
ANT, HUM = (29, (0, 1), 8, 0.5, 0.05), (268, (0, 1, 2), 17, 0.5, 0.015)
EXPECTED = {"reacher": (10, (4, 5, 6), 2, 0.05, 0.02), "ant": ANT, "humanoid": HUM[:4] + (0.03,)}
EXPECTED.update({i: ANT for i in LOCO_IDS if i.startswith("ant_")})
EXPECTED.update({i: HUM for i in LOCO_IDS if i.startswith("humanoid_")})

PAPER_LAYOUTS = {
    "u": "11111 1rgg1 111g1 1ggg1 11111",
    "u4": "11111 1ggg1 1r1g1 111g1 1g1g1 1ggg1 11111",
    "u5": "11111111 1gggggg1 1r1111g1 111111g1 1g1111g1 1gggggg1 11111111",
    "big": "11111111 1rg11gg1 1gg1ggg1 11ggg111 1gg1ggg1 1g1gg1g1 1ggg1gg1 11111111",
    "hardest": "111111111111 1rggg1ggggg1 1g11g1g1g1g1 1gggggg1ggg1 1g1111g111g1 1gg1g1ggggg1 "
    "11g1g1g1g111 1gg1ggg1ggg1 111111111111",
    "u_eval": "11111 1r001 11101 1ggg1 11111",
    "u4_eval": "11111 10001 1r101 11101 1g101 1ggg1 11111",
    "u5_eval": "11111111 10000001 1r111101 11111101 1g1111g1 1gggggg1 11111111",
    "ant_big_eval": "11111111 1r011gg1 100100g1 11000111 10010001 101g01g1 10gg1gg1 11111111",
    "humanoid_big_eval": "11111111 1r011gg1 10010gg1 11000111 10010001 101g01g1 10gg1gg1 11111111",
}
U_PATH = [(1, 1), (1, 2), (1, 3), (2, 3), (3, 3), (3, 2), (3, 1)]  # U corridor from 'r', distance 0..6
MAZE_IDS = [i for i in LOCO_IDS if "maze" in i]
PHYSICS_IDS = ["reacher", "ant", "humanoid", "ant_u_maze", "humanoid_u_maze"]


def maze_of(env_id):
    """(the paper's layout rows, cell size) for a maze id."""
    robot, rest = env_id.split("_", 1)
    name = rest.replace("_maze", "").replace("_stitch", "").replace("_eval", "")
    key = name + "_eval" if env_id.endswith("maze_eval") else name
    key = f"{robot}_{key}" if key == "big_eval" else key
    return PAPER_LAYOUTS[key].split(), {"ant": 4.0, "humanoid": 2.0}[robot]


def cells(rows, scale, kinds):
    return np.array([(i * scale, j * scale) for i, r in enumerate(rows) for j, c in enumerate(r) if c in kinds])


@functools.cache
def compiled(env_id):
    """env, jit(vmap(reset)), jit(vmap(step)), jit(vmap(pipeline_init)): compiled once per id."""
    env = envs.make(env_id)
    return env, jax.jit(jax.vmap(env.reset)), jax.jit(jax.vmap(env.step)), jax.jit(jax.vmap(env.pipeline_init))


def reset_batch(env_id, seed=0):
    return compiled(env_id)[1](jax.random.split(jax.random.PRNGKey(seed), N))


def with_q_qd(env_id, state, q, qd):
    """The batch `state` moved to joint positions q and velocities qd (obs refreshes on the next step)."""
    return state.replace(pipeline_state=compiled(env_id)[3](jnp.asarray(q), jnp.asarray(qd)))


def step(env_id, state, action):
    return compiled(env_id)[2](state, jnp.asarray(action, jnp.float32))


@pytest.mark.parametrize("env_id", LOCO_IDS)
def test_sizes_goal_slice_threshold_dt(env_id):
    env = envs.make(env_id)
    state_dim, goal, action, thresh, dt = EXPECTED[env_id]
    assert env.state_dim == state_dim and tuple(env.goal_indices) == goal
    assert env.action_size == action and env.goal_reach_thresh == thresh
    assert env.observation_size == state_dim + len(goal)
    assert env.dt == pytest.approx(dt, rel=1e-6)


@pytest.mark.parametrize("env_id", PHYSICS_IDS)
def test_random_rollout_is_finite_and_consistent(env_id):
    env, _, _, _ = compiled(env_id)
    state = reset_batch(env_id)
    assert state.obs.shape == (N, env.observation_size)
    goal0 = state.obs[:, env.state_dim :]
    actions = np.random.default_rng(0).uniform(-1, 1, (100, N, env.action_size))
    finite = jnp.array(True)
    for a in actions:
        state = step(env_id, state, a)
        finite &= jnp.isfinite(state.obs).all()
    assert bool(finite)
    # The commanded goal does not drift (but the reacher's target body, whose position is the goal as
    # in the paper's code, sags a few mm on the spring pipeline's soft joints), and dist/success are
    # computed from the obs goal slices.
    drift = np.abs(np.asarray(state.obs[:, env.state_dim :]) - np.asarray(goal0)).max(0)
    if env_id == "reacher":
        assert drift[:2].max() < 1e-4 and drift[2] < 5e-3, drift
    else:
        assert drift.max() < 1e-4, drift
    dist = jnp.linalg.norm(state.obs[:, jnp.array(env.goal_indices)] - state.obs[:, env.state_dim :], axis=1)
    np.testing.assert_allclose(state.metrics["dist"], dist, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state.metrics["success"], (dist < env.goal_reach_thresh).astype(np.float32))
    if env_id != "reacher":
        np.testing.assert_array_equal(state.metrics["success_easy"], (dist < 2.0).astype(np.float32))
    assert set(np.unique(np.asarray(state.done))) <= {0.0, 1.0}


def draw_goals(env_id, seed, n=N):
    """Goals (and starts) as reset draws them: compiled reset for PHYSICS_IDS, else the maze's
    own start/goal sampler (the function reset calls; no physics compile)."""
    env = envs.make(env_id) if env_id not in PHYSICS_IDS else compiled(env_id)[0]
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    if env_id in PHYSICS_IDS:
        obs = np.asarray(compiled(env_id)[1](keys).obs)
        return obs[:, :2], obs[:, env.state_dim : env.state_dim + 2]
    start, goal = jax.vmap(lambda k: sample_start_goal(env.maze, k))(keys)
    return np.asarray(start), np.asarray(goal)


@pytest.mark.parametrize("env_id", LOCO_IDS)
def test_resets_draw_goals_from_the_key(env_id):
    start_a, goals_a = draw_goals(env_id, 1)
    _, goals_b = draw_goals(env_id, 2)
    np.testing.assert_array_equal(goals_a, draw_goals(env_id, 1)[1])
    assert not np.allclose(goals_a, goals_b)
    goal_xy = np.concatenate([goals_a, goals_b])
    radius = np.linalg.norm(goal_xy, axis=1)
    if env_id == "reacher":
        assert radius.max() <= 0.2 + 1e-6
    elif env_id == "ant":
        np.testing.assert_allclose(radius, 10.0, rtol=1e-5)
    elif env_id == "humanoid":
        assert radius.min() >= 1.0 - 1e-5 and radius.max() <= 5.0 + 1e-5
    elif "stitch" not in env_id:  # maze: goals are exactly 'g' cell centres, starts at 'r' (+ noise)
        rows, scale = maze_of(env_id)
        assert np.abs(goal_xy[:, None, :] - cells(rows, scale, "g")[None]).max(-1).min(1).max() < 1e-5
        assert np.abs(start_a[:, None, :] - cells(rows, scale, "r")[None]).max(-1).min(1).max() <= 0.1 + 1e-5


def test_maze_goals_cover_every_goal_cell():
    _, goals = draw_goals("ant_u_maze_eval", 0, n=64)
    rows, scale = maze_of("ant_u_maze_eval")
    hits = {tuple(c) for c in cells(rows, scale, "g") if np.abs(goals - c).max(1).min() < 1e-5}
    assert len(hits) == 3  # (3,1), (3,2), (3,3): the far cells only


@pytest.mark.parametrize("env_id", [i for i in MAZE_IDS if i.endswith(("_eval", "_stitch"))])
def test_maze_variants_share_physics_with_their_training_maze(env_id):
    """Eval and stitching variants keep the training walls: their System (hence step) is identical to
    the training maze's."""
    base = env_id.replace("_eval", "").replace("_stitch", "")
    env, ref = envs.make(env_id), envs.make(base)
    assert type(env) is type(ref) and env.dt == ref.dt
    leaves, ref_leaves = jax.tree_util.tree_leaves(env.sys), jax.tree_util.tree_leaves(ref.sys)
    assert len(leaves) == len(ref_leaves)
    for a, b in zip(leaves, ref_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


SUCCESS_IDS = ["reacher", "ant", "humanoid", "ant_u_maze", "humanoid_u_maze"]


@pytest.mark.parametrize("env_id", SUCCESS_IDS)
def test_success_fires_at_the_goal_and_not_far(env_id):
    env, _, _, _ = compiled(env_id)
    state = reset_batch(env_id)
    q, qd = np.array(state.pipeline_state.q), np.zeros_like(state.pipeline_state.qd)
    achieved = np.asarray(state.obs[:, np.array(env.goal_indices)])
    zero = np.zeros((N, env.action_size))
    q[:, -2:] = achieved[:, :2]  # target joints: put the target on the achieved goal
    near = step(env_id, with_q_qd(env_id, state, q, qd), zero)
    assert float(near.metrics["success"].min()) == 1.0
    assert float(near.metrics["dist"].max()) < env.goal_reach_thresh
    # Far: the target moved 4 success radii (at least 2.5, past the easy radius) toward the origin.
    offset = max(4 * env.goal_reach_thresh, 2.5 if env_id != "reacher" else 0.0)
    norm = np.linalg.norm(achieved[:, :2], axis=1, keepdims=True)
    direction = np.where(norm > 0.1, -achieved[:, :2] / np.maximum(norm, 1e-6), [[1.0, 0.0]])
    q[:, -2:] = achieved[:, :2] + offset * direction
    far = step(env_id, with_q_qd(env_id, state, q, qd), zero)
    assert float(far.metrics["success"].max()) == 0.0
    assert float(far.metrics["dist"].min()) > 3 * env.goal_reach_thresh
    if env_id != "reacher":
        assert float(near.metrics["success_easy"].min()) == 1.0
        assert float(far.metrics["success_easy"].max()) == 0.0


@pytest.mark.parametrize("env_id", ["ant", "humanoid", "ant_u_maze", "humanoid_u_maze"])
def test_effective_dt_from_free_fall(env_id):
    """One control step of free fall from rest: drop = g T^2 (n+1)/(2n) with semi-implicit Euler."""
    env, _, _, _ = compiled(env_id)
    state = reset_batch(env_id)
    q = np.array(state.pipeline_state.q)
    q[:, 2] += 4.0  # high above floor and walls
    after = step(
        env_id, with_q_qd(env_id, state, q, np.zeros_like(state.pipeline_state.qd)), np.zeros((N, env.action_size))
    )
    drop = q[:, 2] - np.asarray(after.pipeline_state.q[:, 2])
    measured_dt = np.sqrt(2 * drop / G / 1.1)  # 10 substeps per control step
    np.testing.assert_allclose(measured_dt, EXPECTED[env_id][4], rtol=0.05)


def test_reacher_effective_dt_and_fingertip_geometry():
    env, _, _, _ = compiled("reacher")
    state = reset_batch("reacher")
    # Arm angles (0,0), (pi/2,0), (0,pi/2), (pi,0): fingertip at 0.1 + 0.11 along the links, z 0.01.
    q = np.zeros((N, 4), np.float32)
    q[1, 0], q[2, 1], q[3, 0] = np.pi / 2, np.pi / 2, np.pi
    qd = np.zeros((N, 4), np.float32)
    qd[:, 0] = 1.0  # joint0 spins at 1 rad/s; its angle after one step measures the control dt
    after = step("reacher", with_q_qd("reacher", state, q, qd), np.zeros((N, 2)))
    turned = (np.asarray(after.pipeline_state.q[:, 0]) - q[:, 0] + np.pi) % (2 * np.pi) - np.pi
    np.testing.assert_allclose(turned, 0.02, rtol=0.05)
    tips = np.asarray(after.obs[:, 4:7])
    expected = np.array([[0.21, 0, 0.01], [0, 0.21, 0.01], [0.1, 0.11, 0.01], [-0.21, 0, 0.01]])
    rot = [0.02, 0.02, 0.02, 0.02]  # the spin of joint0 during the step rotates every tip by ~0.02 rad
    for tip, exp, r in zip(tips, expected, rot):
        c, s = math.cos(r), math.sin(r)
        np.testing.assert_allclose(tip, [c * exp[0] - s * exp[1], s * exp[0] + c * exp[1], exp[2]], atol=3e-3)
    # fingertip velocity = omega x r: (0, 0.21) m/s at unit spin with the arm stretched along x
    # (loose: the spring pipeline's soft joints make link velocities wobble by a few percent)
    np.testing.assert_allclose(after.obs[0, 7:9], [0.0, 0.21], atol=0.02)


def test_humanoid_state_layout():
    env, _, _, _ = compiled("humanoid")
    state = reset_batch("humanoid")
    obs, ps = np.asarray(state.obs), state.pipeline_state
    np.testing.assert_allclose(obs[:, :26], ps.q, atol=1e-6)
    np.testing.assert_allclose(obs[:, 26:51], ps.qd, atol=1e-6)
    inertia = obs[:, 51:171].reshape(N, 12, 10)
    np.testing.assert_allclose(inertia[:, :, 9], np.broadcast_to(env.sys.link.inertia.mass, (N, 12)), rtol=1e-6)
    mats = inertia[:, :, :9].reshape(N, 12, 3, 3)
    np.testing.assert_allclose(mats, np.swapaxes(mats, 2, 3), atol=1e-4)  # inertia matrices are symmetric
    np.testing.assert_allclose(obs[:, 171:243], 0.0, atol=1e-6)  # at rest: no link velocity
    np.testing.assert_allclose(obs[:, 243:268], 0.0)  # no actuation yet
    # Actions in [-1, 1] map onto ctrl range [-0.4, 0.4]; generalized force = gear * ctrl.
    actions = np.stack([np.full(17, v) for v in (1.0, -1.0, 0.0, 0.5)])
    after = step("humanoid", state, actions)
    qfrc = np.asarray(after.obs[:, 243:268])[:, np.asarray(env.sys.actuator.qd_id)]
    gear = np.array([350.0] * 11 + [100.0] * 6)
    np.testing.assert_allclose(qfrc, np.outer([0.4, -0.4, 0.0, 0.2], gear), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("env_id", MAZE_IDS)
def test_maze_walls_stand_where_the_layout_says(env_id):
    env = envs.make(env_id)
    rows, scale = maze_of(env_id)
    sys = env.sys
    is_wall = (np.asarray(sys.geom_bodyid) == 0) & (np.asarray(sys.geom_type) == 6)  # world boxes
    pos, half = np.asarray(sys.geom_pos)[is_wall], np.asarray(sys.geom_size)[is_wall]
    np.testing.assert_allclose(pos[:, 2] - half[:, 2], 0.0, atol=1e-6)  # standing on the floor
    np.testing.assert_allclose(pos[:, 2] + half[:, 2], 0.5 * scale, atol=1e-6)  # 0.5 x cell size tall
    for i, row in enumerate(rows):
        for j, c in enumerate(row):
            inside = np.all(np.abs(np.array([i * scale, j * scale]) - pos[:, :2]) < half[:, :2], axis=1)
            assert inside.sum() == (1 if c == "1" else 0), (i, j, c)
    # the boxes tile the wall cells exactly: total footprint = number of wall cells x cell area
    assert np.sum(4 * half[:, 0] * half[:, 1]) == pytest.approx("".join(rows).count("1") * scale**2)
    # every cell centre is reachable by the target joints
    target_range = np.asarray(sys.jnt_range)[-2:]
    assert target_range[:, 0].max() <= 0 and target_range[:, 1].min() >= (max(len(rows), len(rows[0])) - 1) * scale


@pytest.mark.parametrize("robot,speed,steps", [("ant", 10.0, 30), ("humanoid", 4.0, 60)])
def test_robot_cannot_pass_through_a_wall(robot, speed, steps):
    """Launch the robot toward -x from its start: in the open it travels through where a wall would
    stand; in the U maze the row-0 wall (its face half a cell from the start cell's centre) keeps
    the torso out of the wall's volume."""
    travelled, inside = {}, {}
    scale = {"ant": 4.0, "humanoid": 2.0}[robot]
    for env_id in (robot, f"{robot}_u_maze"):
        env, _, _, _ = compiled(env_id)
        state = reset_batch(env_id)
        q, qd = np.array(state.pipeline_state.q), np.zeros_like(state.pipeline_state.qd)
        qd[:, 0] = -speed
        state = step(env_id, with_q_qd(env_id, state, q, qd), np.zeros((N, env.action_size)))
        torso = [np.asarray(state.pipeline_state.q[:, :3])]
        for _ in range(steps):
            state = step(env_id, state, np.zeros((N, env.action_size)))
            torso.append(np.asarray(state.pipeline_state.q[:, :3]))
        torso = np.array(torso)  # [steps, N, xyz]
        travelled[env_id] = q[:, 0] - torso[..., 0].min(0)
        # where the wall stands: more than half a cell back from the start centre, below scale / 2
        inside[env_id] = (q[:, 0] - torso[..., 0] > scale / 2) & (torso[..., 2] < scale / 2)
    assert travelled[robot].min() > scale  # on open floor the push carries it a whole cell or more
    assert inside[robot].any()  # ... through where the wall would stand
    assert not inside[f"{robot}_u_maze"].any()
    assert travelled[f"{robot}_u_maze"].max() < scale  # in the maze it never gets past the wall
    if robot == "ant":  # the torso sphere (radius 0.25) stays outside the wall
        assert travelled["ant_u_maze"].max() < scale / 2 - 0.25 + 0.05


@pytest.mark.parametrize("variant", ["train", "eval"])
def test_stitching_start_goal_distances(variant):
    env_id = "ant_u_maze_stitch" + ("_eval" if variant == "eval" else "")
    path = np.array(U_PATH) * 4.0
    start, goal = draw_goals(env_id, 0, n=96)
    start_idx = np.abs(start[:, None] - path[None]).max(-1).argmin(1)
    goal_idx = np.abs(goal[:, None] - path[None]).max(-1).argmin(1)
    np.testing.assert_allclose(start, path[start_idx], atol=1e-5)
    np.testing.assert_allclose(goal, path[goal_idx], atol=1e-5)
    distance = goal_idx - start_idx
    if variant == "train":
        assert set(distance) == {1, 2, 3}
        assert set(start_idx) == {0, 1, 2, 3, 4, 5}  # starts all along the path, not only at 'r'
    else:
        assert set(start_idx) == {0} and set(goal_idx) == {4, 5, 6}


@pytest.mark.parametrize(
    "env_id,steps", [("reacher", 2000), ("ant", 500), ("humanoid", 300), ("ant_u_maze", 300), ("humanoid_u_maze", 200)]
)
def test_long_random_rollout_stays_finite(env_id, steps):
    """The paper's code's reacher integrates at the XML's dt and is NaN within ~11 steps; ours must not."""
    env, _, _, _ = compiled(env_id)
    state = reset_batch(env_id, seed=3)
    actions = np.random.default_rng(1).uniform(-1, 1, (steps, N, env.action_size)).astype(np.float32)
    finite = jnp.array(True)
    for a in actions:
        state = step(env_id, state, a)
        finite &= jnp.isfinite(state.obs).all()
    assert bool(finite)


@pytest.mark.parametrize("env_id", ["reacher", "ant", "humanoid_u_maze"])
def test_mjx_backend_gets_the_same_substep(env_id):
    """mjx integrates with opt.timestep, spring with System.dt: both must carry the substep.
    (Stepping mjx is not compiled here: 20-40 s per env on this machine.)"""
    spring, mjx = envs.make(env_id), envs.make(env_id, backend="mjx")
    assert mjx.backend == "mjx" and mjx.dt == pytest.approx(spring.dt)
    assert float(mjx.sys.opt.timestep) == pytest.approx(float(spring.sys.dt))
    assert float(spring.sys.opt.timestep) == pytest.approx(float(spring.sys.dt))


def test_bad_options_fail_early_with_the_name():
    with pytest.raises(TypeError, match="backnd"):
        envs.make("ant", backnd="spring")
    with pytest.raises(ValueError, match="backend"):
        envs.make("reacher", backend="warp")
    with pytest.raises(ValueError, match="reset_noise_scale"):
        envs.make("humanoid_u_maze", reset_noise_scale=-1.0)
    from envs.maze import make_maze

    with pytest.raises(ValueError, match="eval"):
        make_maze(robot="ant", layout="HARDEST", eval=True)
    with pytest.raises(ValueError, match="stitching"):
        make_maze(robot="ant", layout="BIG", stitching="train")
    with pytest.raises(ValueError, match="robot"):
        make_maze(robot="dog", layout="U")
