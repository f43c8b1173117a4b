"""envs core: the registry, the brax 0.10.1 runtime fixes, and the training/evaluation wrappers.

The wrappers are tested on a tiny pure-JAX point env whose every number can be computed by hand;
the real envs have their own test files.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from brax.envs.base import Env, State

import envs
from envs import patches

# --------------------------------------------------------------------------------------------
# Registry


def test_unknown_id_lists_valid_ids():
    with pytest.raises(ValueError) as err:
        envs.make("ant_v_maze")
    assert "ant_v_maze" in str(err.value) and "ant_u_maze" in str(err.value)


def test_registry_has_every_id_of_the_benchmark():
    expected = {
        "reacher",
        "ant",
        "humanoid",
        "arm_push_easy",
        "arm_push_hard",
        "arm_binpick_hard",
        "ant_u_maze",
        "ant_u4_maze",
        "ant_u5_maze",
        "ant_big_maze",
        "ant_hardest_maze",
        "humanoid_u_maze",
        "humanoid_big_maze",
        "humanoid_hardest_maze",
        "ant_u_maze_eval",
        "ant_u4_maze_eval",
        "ant_u5_maze_eval",
        "ant_big_maze_eval",
        "humanoid_u_maze_eval",
        "humanoid_big_maze_eval",
        "ant_u_maze_stitch",
        "ant_u_maze_stitch_eval",
    }
    assert set(envs.ENV_IDS) == expected
    assert envs.eval_variant("ant_u4_maze") == "ant_u4_maze_eval"
    assert envs.eval_variant("ant_hardest_maze") == "ant_hardest_maze"  # no eval layout in the paper's code
    assert envs.eval_variant("reacher") == "reacher"


def test_fixed_option_cannot_be_overridden():
    with pytest.raises(ValueError, match="layout"):
        envs.make("ant_u_maze", layout="BIG")


# --------------------------------------------------------------------------------------------
# brax 0.10.1 defects: present in the installed library, gone with the patch.

_BALL_XML = """
<mujoco>
  <option timestep="0.005"/>
  <worldbody>
    <geom name="floor" type="plane" size="2 2 0.1"/>
    <body name="ball" pos="0 0 0.3">
      <freejoint/>
      <geom type="sphere" size="0.1" mass="1"/>
    </body>
  </worldbody>
</mujoco>
"""


@pytest.fixture(scope="module")
def ball_sys():
    from brax.io import mjcf

    return mjcf.loads(_BALL_XML)


def test_patches_target_the_pinned_brax():
    import brax
    import mujoco

    assert brax.__version__ == patches.EXPECTED_BRAX_VERSION
    assert mujoco.__version__ == "3.2.6"


def test_defect_a_mjx_ncon(ball_sys, monkeypatch):
    from brax import contact
    from brax.spring import pipeline as spring

    state = spring.init(ball_sys, ball_sys.init_q, jnp.zeros(ball_sys.qd_size()))
    monkeypatch.setattr(contact, "mjx", patches.ORIGINALS["brax.contact.mjx"])
    with pytest.raises(AttributeError, match="ncon"):
        contact.get(ball_sys, state.x)
    monkeypatch.undo()
    c = contact.get(ball_sys, state.x)
    assert c is not None and c.dist.shape == (1,)  # ball-floor: exactly one contact pair
    # the ball (radius 0.1) starts 0.3 above the floor: signed distance 0.2
    np.testing.assert_allclose(float(c.dist[0]), 0.2, atol=1e-5)


def test_defect_b_mjx_contact_rebuilt_with_link_idx_twice(monkeypatch):
    # The defect shows where mjx's collision pass leaves the contact untouched (no colliding
    # pair, as in this ghost ball): the previous step's brax Contact is rebuilt with link_idx twice.
    from brax.io import mjcf
    from brax.mjx import pipeline as mjx_pipeline

    ball_sys = mjcf.loads(_BALL_XML.replace('size="0.1"', 'size="0.1" contype="0" conaffinity="0"'))

    def two_steps():
        state = mjx_pipeline.init(ball_sys, ball_sys.init_q, jnp.zeros(ball_sys.qd_size()))
        state = mjx_pipeline.step(ball_sys, state, jnp.zeros(0))
        return mjx_pipeline.step(ball_sys, state, jnp.zeros(0))

    monkeypatch.setattr(mjx_pipeline, "_reformat_contact", patches.ORIGINALS["brax.mjx.pipeline._reformat_contact"])
    with pytest.raises(TypeError, match="link_idx"):
        two_steps()
    monkeypatch.undo()
    state = two_steps()
    # free fall for 2 steps of 5 ms from rest: z = 0.3 - g t^2 / 2 (semi-implicit Euler: g dt^2 (1+2))
    np.testing.assert_allclose(float(state.q[2]), 0.3 - 9.81 * 0.005**2 * 3, atol=1e-4)


def test_defect_c_json_compares_jax_array_with_list(ball_sys):
    from brax.io import json as brax_json
    from brax.spring import pipeline as spring

    state = spring.init(ball_sys, ball_sys.init_q, jnp.zeros(ball_sys.qd_size()))
    with pytest.raises(TypeError, match="=="):
        patches.ORIGINALS["brax.io.json.dumps"](ball_sys, [state])
    text = brax_json.dumps(ball_sys, [state])
    assert '"ball"' in text or "ball" in text


# --------------------------------------------------------------------------------------------
# Wrappers, on a point env: position p in R^2 moves by 0.1 * action per step; the goal is drawn
# uniformly in [-1, 1]^2 at reset; the episode terminates when |p|_inf > 2.05.


class PointEnv(Env):
    state_dim = 2
    goal_indices = (0, 1)
    goal_reach_thresh = 0.05

    def reset(self, rng):
        goal = jax.random.uniform(rng, (2,), minval=-1.0, maxval=1.0)
        pos = jnp.zeros(2)
        metrics = self._metrics(pos, goal)
        return State(pos, jnp.concatenate([pos, goal]), jnp.zeros(()), jnp.zeros(()), metrics, {"goal": goal})

    def step(self, state, action):
        pos = state.pipeline_state + 0.1 * jnp.clip(action, -1, 1)
        goal = state.info["goal"]
        done = (jnp.max(jnp.abs(pos)) > 2.05).astype(jnp.float32)
        metrics = self._metrics(pos, goal)
        return state.replace(
            pipeline_state=pos, obs=jnp.concatenate([pos, goal]), done=done, reward=metrics["success"], metrics=metrics
        )

    def _metrics(self, pos, goal):
        dist = jnp.linalg.norm(pos - goal)
        return {"success": (dist < self.goal_reach_thresh).astype(jnp.float32), "dist": dist}

    @property
    def observation_size(self):
        return 4

    @property
    def action_size(self):
        return 2

    @property
    def backend(self):
        return "none"


def _rollout(env, state, actions):
    step = jax.jit(env.step)
    states = []
    for a in actions:
        state = step(state, a)
        states.append(state)
    return states


def test_training_wrapper_episode_limit_traj_id_and_fresh_goals():
    env = envs.wrap_for_training(PointEnv(), episode_length=5)
    state = jax.jit(env.reset)(jax.random.split(jax.random.PRNGKey(0), 3))
    assert state.info["traj_id"].tolist() == [0, 0, 0]
    goals = [np.asarray(state.info["goal"])]
    states = _rollout(env, state, [jnp.zeros((3, 2))] * 12)
    dones = np.array([s.done for s in states])
    # episodes of 5 steps: done at steps 5 and 10 (1-based), for every env
    assert dones[:, 0].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0]
    assert np.array([s.info["truncation"] for s in states])[4].tolist() == [1, 1, 1]
    assert states[-1].info["traj_id"].tolist() == [2, 2, 2]
    assert states[4].info["steps"].tolist() == [0, 0, 0]  # already the first state of the next episode
    goals += [np.asarray(states[4].info["goal"]), np.asarray(states[9].info["goal"])]
    # a fresh goal on every reset, and the observation shows the new goal
    assert not np.allclose(goals[0], goals[1]) and not np.allclose(goals[1], goals[2])
    np.testing.assert_allclose(np.asarray(states[4].obs[:, 2:]), goals[1])
    np.testing.assert_allclose(np.asarray(states[4].obs[:, :2]), 0.0)
    # goals within an episode do not change
    np.testing.assert_allclose(np.asarray(states[6].info["goal"]), goals[1])


def test_training_wrapper_keeps_the_observation_an_episode_ended_in():
    """At an episode end the returned obs is the fresh reset; info['last_obs'] is where it ended."""
    raw = PointEnv()
    env = envs.wrap_for_training(raw, episode_length=3)
    state = jax.jit(env.reset)(jax.random.split(jax.random.PRNGKey(0), 2))
    np.testing.assert_allclose(np.asarray(state.info["last_obs"]), np.asarray(state.obs))
    action = jnp.full((2, 2), 0.5)
    states = _rollout(env, state, [action] * 4)
    ended = states[2]
    assert ended.done.tolist() == [1, 1]
    np.testing.assert_allclose(np.asarray(ended.info["last_obs"][:, :2]), 0.15, atol=1e-6)  # 3 steps of 0.05
    np.testing.assert_allclose(np.asarray(ended.obs[:, :2]), 0.0)  # the obs itself is the fresh reset
    np.testing.assert_allclose(np.asarray(states[3].info["last_obs"]), np.asarray(states[3].obs))


def test_training_wrapper_cached_reset_replays_the_first_goal():
    env = envs.wrap_for_training(PointEnv(), episode_length=3, cached_reset=True)
    state = jax.jit(env.reset)(jax.random.split(jax.random.PRNGKey(1), 2))
    first_obs = np.asarray(state.obs)
    states = _rollout(env, state, [jnp.ones((2, 2))] * 7)
    np.testing.assert_allclose(np.asarray(states[2].obs), first_obs)  # reset after 3 steps
    np.testing.assert_allclose(np.asarray(states[5].obs), first_obs)
    assert states[-1].info["traj_id"].tolist() == [2, 2]


def test_training_wrapper_resets_only_the_terminated_env():
    env = envs.wrap_for_training(PointEnv(), episode_length=100)
    state = jax.jit(env.reset)(jax.random.split(jax.random.PRNGKey(2), 2))
    push_env0_out = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    states = _rollout(env, state, [push_env0_out] * 21)
    # env 0 leaves the box at step 21 (|p| = 2.1 > 2.05), env 1 never terminates
    assert [float(s.done[0]) for s in states].index(1.0) == 20
    assert states[-1].info["traj_id"].tolist() == [1, 0]
    assert states[-1].info["truncation"].tolist() == [0, 0]
    np.testing.assert_allclose(np.asarray(states[-1].obs[0, :2]), 0.0)  # reset to the start
    assert float(states[-1].info["steps"][1]) == 21


def test_evaluate_counts_steps_near_goal_over_the_active_episode():
    env = PointEnv()
    L = 40

    def go_to_goal(obs):  # 0.1 per step straight at the goal, then stay
        delta = obs[:, 2:] - obs[:, :2]
        return jnp.clip(delta / 0.1, -1, 1)

    m = jax.jit(lambda k: envs.evaluate(env, go_to_goal, k, num_envs=8, episode_length=L))(jax.random.PRNGKey(3))
    # goals are in [-1,1]^2: reached within 10 steps per axis; the count per env is exact
    goals = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(3), 8)).info["goal"]
    steps_to_reach = np.ceil(np.max(np.abs(np.asarray(goals)), axis=1) / 0.1 - 1e-6)
    expected = np.mean(L - steps_to_reach + 1)
    assert float(m["episode_success"]) == pytest.approx(expected, abs=1.0)
    assert float(m["episode_success_any"]) == 1.0
    assert float(m["episode_length"]) == L

    def run_away(obs):
        return jnp.ones_like(obs[:, :2])

    m = envs.evaluate(env, run_away, jax.random.PRNGKey(3), num_envs=4, episode_length=L)
    # terminates at step 21; the distance is averaged over the 21 active steps only
    assert float(m["episode_length"]) == 21
    assert float(m["episode_success_any"]) <= 0.25
