"""Training and evaluation wrappers shared by every algorithm script (API: docs/conventions.md).

Why not brax's own wrappers: brax's AutoResetWrapper restores the cached first state, so each
parallel env replays one start and one goal for the whole run (JaxGCRL issue #53). Here a reset
draws a fresh goal (and start) by default, and every reset bumps a per-env trajectory id, which the
replay buffers use so that a hindsight goal never comes from another episode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from brax.envs.base import Env, State, Wrapper


def _select(mask: jax.Array, if_true, if_false):
    """Per-env select over matching pytrees whose leaves have a leading batch axis."""

    def pick(x, y):
        m = jnp.reshape(mask, mask.shape + (1,) * (x.ndim - mask.ndim))
        return jnp.where(m, x, y).astype(y.dtype)  # keep dtypes stable across lax.cond branches

    return jax.tree_util.tree_map(pick, if_true, if_false)


class TrainingEnv(Wrapper):
    """Batched env with an episode limit and auto-reset; see `wrap_for_training`."""

    def __init__(self, env: Env, episode_length: int, cached_reset: bool):
        super().__init__(env)
        if episode_length < 1:
            raise ValueError(f"episode_length must be >= 1, got {episode_length}")
        self.episode_length = int(episode_length)
        self.cached_reset = bool(cached_reset)

    def reset(self, rng: jax.Array) -> State:
        if rng.ndim != 2:
            raise ValueError(f"reset expects keys of shape [num_envs, 2], got {rng.shape}")
        keys = jax.vmap(jax.random.split)(rng)  # [n, 2, 2]: one for now, one carried for later resets
        state = jax.vmap(self.env.reset)(keys[:, 0])
        n = rng.shape[0]
        state.info.update(
            reset_key=keys[:, 1],
            traj_id=jnp.zeros(n, jnp.int32),
            steps=jnp.zeros(n, jnp.int32),
            truncation=jnp.zeros(n),
            last_obs=state.obs,
        )
        if self.cached_reset:
            state.info.update(first_pipeline_state=state.pipeline_state, first_obs=state.obs)
        return state.replace(done=jnp.zeros(n))

    def step(self, state: State, action: jax.Array) -> State:
        state = jax.vmap(self.env.step)(state.replace(done=jnp.zeros_like(state.done)), action)
        steps = state.info["steps"] + 1
        out_of_time = steps >= self.episode_length
        terminated = state.done > 0
        done = terminated | out_of_time
        info = dict(state.info)
        info["truncation"] = (out_of_time & ~terminated).astype(jnp.float32)
        info["steps"] = jnp.where(done, 0, steps)
        info["traj_id"] = state.info["traj_id"] + done.astype(jnp.int32)
        info["last_obs"] = state.obs  # the observation this step reached, kept through the reset
        state = state.replace(info=info, done=done.astype(jnp.float32))
        if self.cached_reset:
            pipeline_state = _select(done, info["first_pipeline_state"], state.pipeline_state)
            obs = _select(done, info["first_obs"], state.obs)
            return state.replace(pipeline_state=pipeline_state, obs=obs)
        # Resets are rare (once per episode): skip the work on steps where no env is done.
        return jax.lax.cond(jnp.any(done), self._fresh_reset, lambda s: s, state)

    def _fresh_reset(self, state: State) -> State:
        done = state.done > 0
        keys = jax.vmap(jax.random.split)(state.info["reset_key"])
        fresh = jax.vmap(self.env.reset)(keys[:, 0])
        # The env's own info entries (e.g. its goal) come from the fresh episode; the wrapper's
        # bookkeeping (traj_id, steps, ...) stays as computed in `step`.
        info = dict(state.info)
        for k, v in fresh.info.items():
            info[k] = _select(done, v, state.info[k])
        info["reset_key"] = _select(done, keys[:, 1], state.info["reset_key"])
        return state.replace(
            pipeline_state=_select(done, fresh.pipeline_state, state.pipeline_state),
            obs=_select(done, fresh.obs, state.obs),
            info=info,
        )


def wrap_for_training(env: Env, episode_length: int = 1000, cached_reset: bool = False) -> TrainingEnv:
    """Batched training env: `reset(keys[n, 2])`, `step(state, actions[n, A])`.

    Episodes end at `episode_length` steps or on the env's own termination and reset
    automatically; the returned state is already the first state of the next episode where
    `state.done` is set. `state.info['traj_id']` counts the resets of each env, and
    `state.info['last_obs']` is the observation the step reached before any reset (what a TD
    method's relabelled reward and bootstrap need at an episode's last step).
    cached_reset=True reproduces brax's AutoResetWrapper (the first state is restored: one start
    and goal per env for the whole run), for exact comparisons with the paper's runs.
    """
    return TrainingEnv(env, episode_length, cached_reset)


def evaluate(env: Env, act_fn, key: jax.Array, num_envs: int, episode_length: int = 1000) -> dict:
    """One episode per env from fresh resets with `act_fn(obs) -> actions`; jax-traceable.

    Per-step metrics are summed over the active part of each episode (until the env terminates,
    the terminating step included) and averaged over envs. `episode_success` is the paper's
    metric: the number of steps near the goal, out of `episode_length`.
    """
    state = jax.vmap(env.reset)(jax.random.split(key, num_envs))
    summed = [k for k in ("success", "success_easy", "success_hard", "dist") if k in state.metrics]

    def one_step(carry, _):
        state, active, totals, ever = carry
        state = jax.vmap(env.step)(state, act_fn(state.obs))
        totals = {k: totals[k] + active * state.metrics[k] for k in summed} | {"length": totals["length"] + active}
        ever = jnp.maximum(ever, active * state.metrics["success"])
        active = active * (1.0 - state.done)
        return (state, active, totals, ever), None

    ones = jnp.ones(num_envs)
    totals = {k: jnp.zeros(num_envs) for k in summed + ["length"]}
    (_, _, totals, ever), _ = jax.lax.scan(
        one_step, (state, ones, totals, jnp.zeros(num_envs)), None, length=episode_length
    )
    metrics = {f"episode_{k}": jnp.mean(totals[k]) for k in summed if k != "dist"}
    metrics["episode_success_any"] = jnp.mean(ever > 0)
    metrics["episode_dist"] = jnp.mean(totals["dist"] / jnp.maximum(totals["length"], 1.0))
    metrics["episode_length"] = jnp.mean(totals["length"])
    return metrics
