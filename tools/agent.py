"""A trained crl_deep agent loaded from its run folder, plus jitted rollouts of its policy.

Shared by the analysis tools (Q map, representations, residual norms, videos). Only crl_deep.py
checkpoints are supported: the figures need its critic encoders phi(s, a) and psi(g). A
`--num-seeds N` run holds N agents stacked on a leading seed axis; `run_seed` picks one
(`select_seed`, which tools/evaluate.py shares).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass

import runkit

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
    run_seed: int | None = None  # the seed picked from the run (--run-seed), None when not given

    @property
    def label(self) -> str:
        a = self.args
        depth = (
            f"d{a.depth}"
            if not (a.actor_depth or a.critic_depth)
            else f"actor d{a.actor_depth or a.depth} / critic d{a.critic_depth or a.depth}"
        )
        seed = "" if self.run_seed is None else f", seed {self.run_seed}"
        return f"{depth}, w{a.width} ({os.path.basename(os.path.normpath(self.run_path))}{seed})"

    @property
    def run_info(self) -> dict:
        """{"run": run folder} plus {"run_seed": S} when a seed was picked: the tools' JSON says whose numbers."""
        return {"run": self.run_path, **({} if self.run_seed is None else {"run_seed": self.run_seed})}

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


def run_seeds(args) -> range:
    """The seeds a run trained: args.seed .. args.seed + num_seeds - 1 (one seed without --num-seeds)."""
    return range(args.seed, args.seed + getattr(args, "num_seeds", 1))


def select_seed(run_path: str, args, params, run_seed: int | None):
    """(args, params) of seed `run_seed` of a run; ValueError with one line if it is not one of its seeds.

    A `--num-seeds N` run stacks every array of `params` on a leading [N] seed axis: the slice of
    seed S is the agent a run of `--seed S` alone would have, and the returned args are that run's
    (seed=S, num_seeds=1). A single-seed run is returned as it is; `run_seed` may be None or its seed.
    """
    seeds = run_seeds(args)
    if len(seeds) > 1 and run_seed is None:
        raise ValueError(f"{run_path}: a run of {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}); pick one with --run-seed")
    if run_seed is not None and run_seed not in seeds:
        raise ValueError(f"{run_path}: --run-seed {run_seed} is not one of the run's seeds {list(seeds)}")
    if len(seeds) == 1:
        return args, params
    import jax

    params = jax.tree_util.tree_map(lambda x: x[run_seed - args.seed], params)
    return dataclasses.replace(args, seed=run_seed, num_seeds=1), params


def load_agent(path: str, run_seed: int | None = None) -> Agent:
    """Loads a crl_deep run folder (or its checkpoint.msgpack); ValueError with one line if it cannot.

    `run_seed`: which seed of a `--num-seeds` run (required there; see `select_seed`)."""
    run_path = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(run_path, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            script = json.load(f).get("script", "crl_deep")
        if script != "crl_deep":
            raise ValueError(f"{path}: a {script} run; this tool reads crl_deep checkpoints only")
    module = importlib.import_module("crl_deep")
    try:
        ckpt = runkit.load_checkpoint(path, "crl_deep")
    except SystemExit as e:  # runkit's one-line error, "error: <file>: <what is wrong>"
        raise ValueError(str(e.code).removeprefix("error: ")) from None
    fields = {f for f in module.Args.__dataclass_fields__}
    args = module.Args(**{k: v for k, v in ckpt["args"].items() if k in fields})
    args, params = select_seed(run_path, args, ckpt["params"], run_seed)
    import envs

    env = envs.make(args.env)
    nets = module.build_networks(args, env.observation_size, len(env.goal_indices), env.action_size)
    return Agent(
        run_path=run_path,
        module=module,
        args=args,
        params=params,
        nets=nets,
        epoch=int(ckpt.get("epoch", -1)),
        env_steps=int(ckpt.get("env_steps", 0)),
        run_seed=run_seed,
    )


RUN_SEED_HELP = (
    "which seed of a --num-seeds run to load (required there): one seed for every run, or one per run in order"
)


def load_agents(paths: list[str], run_seeds: list[int] | None = None) -> list[Agent]:
    """load_agent of each path; `run_seeds` (--run-seed): None, one seed for every run, or one per run."""
    if not run_seeds:
        run_seeds = [None] * len(paths)
    elif len(run_seeds) == 1:
        run_seeds = run_seeds * len(paths)
    elif len(run_seeds) != len(paths):
        raise ValueError(f"--run-seed: {len(run_seeds)} seeds for {len(paths)} runs; give one seed, or one per run")
    return [load_agent(p, s) for p, s in zip(paths, run_seeds)]


def seed_out_path(path: str, run_seeds) -> str:
    """A default output file named after the seed(s) picked: figures/qmap.png -> figures/qmap_s1.png
    (seeds 1 and 2 of two runs: qmap_s1_2.png); unchanged without --run-seed."""
    if run_seeds is None or (not isinstance(run_seeds, int) and not run_seeds):
        return path
    seeds = [run_seeds] if isinstance(run_seeds, int) else list(dict.fromkeys(run_seeds))
    stem, ext = os.path.splitext(path)
    return f"{stem}_s{'_'.join(str(s) for s in seeds)}{ext}"


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
