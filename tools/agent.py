"""A trained crl_deep agent loaded from its run folder, plus jitted rollouts of its policy.

Shared by the analysis tools (Q map, representations, residual norms, videos). Only crl_deep.py
checkpoints are supported: the figures need its critic encoders phi(s, a) and psi(g).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Agent:
    """Everything a tool needs to run a checkpoint's networks."""

    run_path: str
    module: object  # the crl_deep module
    args: object  # crl_deep.Args of the run
    params: dict  # {"actor", "sa_encoder", "g_encoder"}: flax variable dicts of numpy arrays
    nets: object  # crl_deep.Networks
    epoch: int
    env_steps: int

    @property
    def label(self) -> str:
        a = self.args
        depth = (
            f"d{a.depth}"
            if not (a.actor_depth or a.critic_depth)
            else f"actor d{a.actor_depth or a.depth} / critic d{a.critic_depth or a.depth}"
        )
        return f"{depth}, w{a.width} ({os.path.basename(os.path.normpath(self.run_path))})"

    def with_params(self, params) -> Agent:
        """The same agent with other (e.g. traced) params: jit functions of params, not of constants."""
        return dataclasses.replace(self, params=params)

    def act(self, obs):
        """Deterministic action tanh(mean) for obs = concat[state, goal] ([B, obs_size])."""
        return self.module.deterministic_action(self.nets.actor, self.params["actor"], obs)

    def phi(self, states, actions):
        import jax.numpy as jnp

        return self.nets.sa_encoder.apply(self.params["sa_encoder"], jnp.concatenate([states, actions], -1))

    def psi(self, goals):
        return self.nets.g_encoder.apply(self.params["g_encoder"], goals)

    def critic(self, states, actions, goals):
        """f(s_i, a_i, g_i) per row: the energy the run was trained with (the Q-value up to a monotone map)."""
        return self.module.energy_rowwise(self.phi(states, actions), self.psi(goals), self.args.energy)


def load_agent(path: str) -> Agent:
    """Loads a crl_deep run folder (or its checkpoint.msgpack); ValueError with one line if it cannot."""
    run_path = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(run_path, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            script = json.load(f).get("script", "crl_deep")
        if script != "crl_deep":
            raise ValueError(f"{path}: a {script} run; this tool reads crl_deep checkpoints only")
    module = importlib.import_module("crl_deep")
    try:
        ckpt = module.load_checkpoint(path)
    except SystemExit as e:  # the script's one-line error, "error: <file>: <what is wrong>"
        raise ValueError(str(e.code).removeprefix("error: ")) from None
    fields = {f for f in module.Args.__dataclass_fields__}
    args = module.Args(**{k: v for k, v in ckpt["args"].items() if k in fields})
    import envs

    env = envs.make(args.env)
    nets = module.build_networks(args, env.observation_size, len(env.goal_indices), env.action_size)
    return Agent(
        run_path=run_path,
        module=module,
        args=args,
        params=ckpt["params"],
        nets=nets,
        epoch=int(ckpt.get("epoch", -1)),
        env_steps=int(ckpt.get("env_steps", 0)),
    )


def rollout(env, agent: Agent, key, num_envs: int, num_steps: int):
    """One episode per env with the deterministic policy, from fresh resets (no auto-reset).

    Returns numpy arrays: obs [T+1, N, obs_size], actions [T, N, A], qpos [T+1, N, nq],
    success [T+1, N], dist [T+1, N], alive [T+1, N] (False from the step after the env terminated).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.jit
    def run(params, key):  # params as an argument, not a constant: one compile serves every run
        policy = agent.with_params(params)
        state = jax.vmap(env.reset)(jax.random.split(key, num_envs))

        def step(carry, _):
            state, alive = carry
            action = policy.act(state.obs)
            nxt = jax.vmap(env.step)(state, action)
            alive_next = alive * (1.0 - nxt.done)
            record = (nxt.obs, action, nxt.pipeline_state.q, nxt.metrics["success"], nxt.metrics["dist"], alive_next)
            return (nxt, alive_next), record

        first = (state.obs, state.pipeline_state.q, state.metrics["success"], state.metrics["dist"])
        _, (obs, actions, q, success, dist, alive) = jax.lax.scan(
            step, (state, jnp.ones(num_envs)), None, length=num_steps
        )
        cat = lambda a, b: jnp.concatenate([a[None], b])  # noqa: E731
        return (
            cat(first[0], obs),
            actions,
            cat(first[1], q),
            cat(first[2], success),
            cat(first[3], dist),
            cat(jnp.ones(num_envs), alive),
        )

    obs, actions, q, success, dist, alive = jax.device_get(run(agent.params, key))
    return {
        "obs": np.asarray(obs),
        "actions": np.asarray(actions),
        "qpos": np.asarray(q),
        "success": np.asarray(success),
        "dist": np.asarray(dist),
        "alive": np.asarray(alive) > 0.5,
    }


def best_episode(traj: dict) -> int:
    """Index of the env whose episode spent the most alive steps at the goal (ties: smallest final
    distance), i.e. the 'successful rollout' the representation figure wants."""
    import numpy as np

    steps_at_goal = (traj["success"] * traj["alive"]).sum(0)
    final_dist = np.array([traj["dist"][traj["alive"][:, i], i][-1] for i in range(traj["dist"].shape[1])])
    order = np.lexsort((final_dist, -steps_at_goal))
    return int(order[0])
