"""Every env against the paper's own code: golden trajectories in tests/golden/ (README there), all 14
env ids the paper's code has.

A file holds a start state and goal, 40 actions and what the paper's env observed. We start our
env from that state with `env.reset_to(q0, qd0, goal0)`, apply the actions and compare every
observation dim and the success/dist metrics, entry by entry:
|ours - golden| <= rtol * max(1, |golden|), rtol 1e-3 for steps 1-10 and 1e-2 from step 11 on
(float rounding grows slowly in these chaotic systems). Success must be equal at every compared step.

One rule for every env says how far a trajectory is compared: while it is predictable. Contact events
(a foot or a finger striking a wall or the cube) make later steps depend on float rounding alone. So
the same env is also run from q0 plus two random perturbations of size 1e-6, and the comparison stops
before the first step at which either differs from the unperturbed run by more than 1e-3 (in the same
max(1, |x|) scale). At least 10 steps must be predictable; each env's count is printed.

The files pin one start per env. Other starts are covered where a reference exists for any state:
`reset_to` must rebuild a reset exactly (so the golden start runs the same code as training),
and the humanoid's derived features must equal those of brax's own humanoid env (the formula the
paper's code uses) along random rollouts from other seeds.

Compilation dominates the run time: each env's reset, step and reset_to are compiled once and
shared by the tests (see `Compiled`).
"""

import functools
import os
import types

import jax
import numpy as np
import pytest
from brax.envs.humanoid import Humanoid as BraxHumanoid

import envs

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
GOLDEN_IDS = sorted(f[: -len(".npz")] for f in os.listdir(GOLDEN_DIR) if f.endswith(".npz"))
TOLERANCE = ((10, 1e-3), (40, 1e-2))  # (last step, rtol) per step range; step 0 is the start
PERTURBATION, PREDICTABLE, MIN_PREDICTABLE = 1e-6, 1e-3, 10


@functools.cache
def golden(env_id) -> dict:
    with np.load(os.path.join(GOLDEN_DIR, f"{env_id}.npz")) as data:
        return {k: data[k] for k in data.files}


class Compiled:
    """One env with its jitted reset, step and reset_to, each compiled once, unbatched: a vmapped
    step compiles 1.3-2x slower on CPU (measured for ant, humanoid, their mazes and arm_push_easy)."""

    def __init__(self, env_id):
        self.env = envs.make(env_id)
        self.reset, self.step, self.reset_to = (jax.jit(f) for f in (self.env.reset, self.env.step, self.env.reset_to))


@functools.cache
def compiled(env_id) -> Compiled:
    return Compiled(env_id)


def rollout(c: Compiled, q0, qd0, goal0, actions):
    """Observations [41, obs], success [40] and dist [40] from (q0, qd0, goal0) along the actions."""
    state = c.reset_to(q0, qd0, goal0)
    obs, success, dist = [state.obs], [], []
    for action in actions:
        state = c.step(state, action)
        obs.append(state.obs)
        success.append(state.metrics["success"])
        dist.append(state.metrics["dist"])
    return np.asarray(obs), np.asarray(success), np.asarray(dist)


@functools.cache
def replay(env_id):
    """Our rollout along the golden start and actions."""
    data = golden(env_id)
    return rollout(compiled(env_id), data["q0"], data["qd0"], data["goal0"], data["actions"])


@functools.cache
def predictable_steps(env_id) -> int:
    """Steps 0..n-1 are predictable: runs from q0 plus two random PERTURBATION-sized offsets stay within
    PREDICTABLE * max(1, |x|) of the unperturbed run there; step n is the first where one does not."""
    data, c = golden(env_id), compiled(env_id)
    obs, _, _ = replay(env_id)
    rng = np.random.default_rng(0)
    first_apart = len(obs)
    for _ in range(2):
        q0 = data["q0"] + PERTURBATION * rng.uniform(-1, 1, data["q0"].shape).astype(np.float32)
        perturbed, _, _ = rollout(c, q0, data["qd0"], data["goal0"], data["actions"])
        apart = np.any(np.abs(perturbed - obs) > PREDICTABLE * np.maximum(1.0, np.abs(obs)), axis=1)
        first_apart = min(first_apart, int(np.argmax(apart)) if apart.any() else len(obs))
    return first_apart


def step_tolerances(steps: int) -> np.ndarray:
    """rtol of steps 0..steps-1."""
    rtol, first = [], 0
    for last, tol in TOLERANCE:
        rtol += [tol] * (last + 1 - first)
        first = last + 1
    return np.array(rtol[:steps])


def assert_close_per_step(what, ours, expected, rtol):
    """ours/expected [steps, ...]: entry-wise |ours - expected| <= rtol[step] * max(1, |expected|)."""
    shape = (-1,) + (1,) * (expected.ndim - 1)
    bound = rtol.reshape(shape) * np.maximum(1.0, np.abs(expected))
    bad = np.argwhere(~(np.abs(ours - expected) <= bound))
    if len(bad):
        idx = tuple(bad[0])
        raise AssertionError(
            f"{what}: {len(bad)} entries out of tolerance; first at (step, dim) {idx}: "
            f"ours {ours[idx]:.6g}, paper's code {expected[idx]:.6g}, bound {bound[idx]:.3g}"
        )


@pytest.mark.parametrize("env_id", GOLDEN_IDS)
def test_golden_trajectory_matches_the_papers_code(env_id):
    data = golden(env_id)
    env = compiled(env_id).env
    assert env.observation_size == data["obs"].shape[1] and env.state_dim == int(data["state_dim"])
    assert env.action_size == data["actions"].shape[1]
    assert env.dt == pytest.approx(float(data["dt"]), rel=1e-6)
    obs, success, dist = replay(env_id)
    n = predictable_steps(env_id)  # steps 0..n-1 compared
    print(f"{env_id}: {n} of {len(obs)} steps predictable and compared")
    assert n >= MIN_PREDICTABLE, f"{env_id}: only {n} predictable steps"
    rtol = step_tolerances(n)
    assert_close_per_step("observation", obs[:n], data["obs"][:n], rtol)
    # metrics after action t belong to step t + 1
    np.testing.assert_array_equal(success[: n - 1], data["success"][: n - 1], err_msg="success")
    has_dist = np.isfinite(data["dist"][: n - 1])
    assert_close_per_step("dist", dist[: n - 1][has_dist], data["dist"][: n - 1][has_dist], rtol[1:][has_dist])


@pytest.mark.parametrize("env_id", ["reacher", "ant", "ant_u4_maze", "humanoid", "humanoid_u_maze"])
def test_reset_to_rebuilds_a_reset_exactly(env_id):
    """reset_to(reset's own q, qd, goal) returns the very State reset returned (one env per class;
    the arm env's reset is reset_to(*sample_start(key)) by definition, and compiling its reset
    would cost ~10 s)."""
    c = compiled(env_id)
    for seed in (1, 2):
        state = c.reset(jax.random.PRNGKey(seed))
        goal = state.obs[c.env.state_dim :]
        rebuilt = c.reset_to(state.pipeline_state.q, state.pipeline_state.qd, goal)
        assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(state)
        leaves = zip(jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves(rebuilt))
        for (path, a), b in leaves:
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(path))


def test_reset_to_takes_the_goal_from_its_argument():
    """The goal argument commands the target, whatever the target joints in q say."""
    c = compiled("ant")
    data = golden("ant")
    q0 = data["q0"].copy()
    q0[-2:] = 0.0
    goal = data["goal0"] + np.array([1.0, -2.0], np.float32)
    state = c.reset_to(q0, data["qd0"], goal)
    np.testing.assert_allclose(state.obs[c.env.state_dim :], goal, atol=1e-6)
    np.testing.assert_allclose(state.obs[: c.env.state_dim], data["obs"][0, : c.env.state_dim], atol=1e-6)
    np.testing.assert_allclose(state.metrics["dist"], np.linalg.norm(data["obs"][0, :2] - goal), rtol=1e-5)


def brax_humanoid_obs(sys, backend):
    """brax's own humanoid env's observation function bound to our System: (pipeline_state, ctrl) -> obs."""
    ref = types.SimpleNamespace(sys=sys, backend=backend, _exclude_current_positions_from_observation=False)
    ref._com = functools.partial(BraxHumanoid._com, ref)
    return functools.partial(BraxHumanoid._get_obs, ref)


def test_humanoid_features_follow_brax_humanoid_along_other_rollouts(env_id="humanoid"):
    """Along random rollouts from other starts, every state dim equals brax's humanoid formula on
    the spring backend (the paper's features); true_inertia_obs=True equals the formula with the
    physical inertias (brax's non-spring path) and differs only in the link inertia dims."""
    c = compiled(env_id)
    env = c.env
    true_env = envs.make(env_id, true_inertia_obs=True)
    low, high = np.asarray(env.sys.actuator.ctrl_range).T
    paper = jax.jit(brax_humanoid_obs(env.sys, "spring"))
    physical = jax.jit(brax_humanoid_obs(env.sys, "mjx"))
    true_obs = jax.jit(true_env._observe)
    inertia_dims = np.zeros(env.state_dim, bool)
    inertia_dims[51:171] = True
    rng = np.random.default_rng(3)
    for seed in (5, 6):
        state = c.reset(jax.random.PRNGKey(seed))
        for t in range(30):
            action = rng.uniform(-1, 1, env.action_size).astype(np.float32)
            state = c.step(state, action)
            ctrl = low + (action + 1.0) * 0.5 * (high - low)
            ours = np.asarray(state.obs[: env.state_dim])
            np.testing.assert_allclose(
                ours, paper(state.pipeline_state, ctrl), rtol=1e-5, atol=1e-5, err_msg=f"seed {seed} step {t}"
            )
            ours_true = np.asarray(true_obs(state.pipeline_state, ctrl))[: env.state_dim]
            np.testing.assert_allclose(ours_true, physical(state.pipeline_state, ctrl), rtol=1e-5, atol=1e-5)
            # the rest agrees to float rounding (the paper's formula computes mass ** (1 - 0))
            np.testing.assert_allclose(ours_true[~inertia_dims], ours[~inertia_dims], rtol=1e-5, atol=1e-5)
    assert np.abs(ours_true[inertia_dims] - ours[inertia_dims]).max() > 0.5  # the option matters


def test_true_inertia_obs_is_an_option_of_humanoids_only():
    assert envs.make("humanoid").true_inertia_obs is False
    assert envs.make("humanoid_big_maze", true_inertia_obs=True).true_inertia_obs is True
    with pytest.raises(TypeError, match="true_inertia_obs"):
        envs.make("ant", true_inertia_obs=True)
    with pytest.raises(TypeError, match="true_inertia_obs"):
        envs.make("humanoid", true_inertia_obs="yes")
