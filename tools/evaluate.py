"""Evaluate a saved run's policy: the paper's metrics as JSON, optionally on another env and with a video.

    python -m tools.evaluate runs/<run>                              # the run's eval env, its own key
    python -m tools.evaluate runs/<run> --env ant_big_maze_eval --episodes 256
    python -m tools.evaluate runs/<run> --video figures/rollout.mp4
    python -m tools.evaluate runs/<run> --run-seed 1                 # one seed of a --num-seeds run

Loads the latest checkpoint of a run made by any training script (`config.json` names it:
crl_deep, sac_her, td3_her, gcbc, offline_crl, qrl) with `runkit.load_checkpoint`, rebuilds
its policy network from the run's `Args` with the script's own constructors, and runs the
deterministic policy exactly as the script evaluates after each epoch: `envs.evaluate` on the run's
eval env (`--eval-env`, else the `_eval` variant of `--env`), one episode per eval env. With no
options the key is the one the run used for that checkpoint's epoch, so the printed numbers are
the ones `metrics.jsonl` logged for it; `--env`, `--episodes` or `--seed` evaluate afresh.
offline_crl, offline qrl and offline gcbc (GCBC or --no-goal BC) runs on OGBench envs are evaluated with
the script's own OGBench loop (its 5 tasks, the run's episodes per task and seed).

`--video out.mp4` (or .gif) renders the best of the evaluated episodes (most steps at the goal)
the way tools/video.py does; it needs an OpenGL backend (docs/tools.md).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too

import argparse
import dataclasses
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import runkit
from envs import ogbench
from tools.agent import select_seed


@dataclass
class Policy:
    """A run's deterministic policy, ready to evaluate."""

    run_path: str
    script: str
    module: object  # the training script, imported
    args: object  # the script's Args of the run
    act: Callable  # act(params, obs [B, obs_size]) -> actions [B, A]; jax-traceable
    params: object  # the actor's parameters from the checkpoint
    epoch: int
    env_steps: int

    # params bound, swappable for traced ones (jit a function of the params, not of constants)
    def with_params(self, params) -> Policy:
        return dataclasses.replace(self, params=params)

    def __call__(self, obs):
        return self.act(self.params, obs)


def run_script(run_path: str) -> str:
    """The training script named by the run's config.json."""
    cfg_path = os.path.join(run_path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{run_path}: no config.json (not a run folder)")
    with open(cfg_path) as f:
        script = json.load(f).get("script")
    if script not in POLICY_BUILDERS:
        raise ValueError(
            f"{run_path}: config.json names script {script!r}; this tool evaluates {', '.join(POLICY_BUILDERS)}"
        )
    return script


def load_policy(run_path: str, run_seed: int | None = None) -> Policy:
    """The run's latest checkpoint as a policy; ValueError with one line if it cannot be loaded.

    A `--num-seeds N` run of crl_deep.py holds N agents stacked on a leading axis: `run_seed` picks
    one (seed S of the run is what a run of `--seed S` alone would be, its evaluation key included)."""
    run_path = os.path.normpath(run_path)
    if not os.path.isdir(run_path):
        raise ValueError(f"{run_path}: not a directory")
    script = run_script(run_path)
    module = importlib.import_module(script)  # the scripts sit at the repository root
    try:
        ckpt = runkit.load_checkpoint(run_path, script)
    except SystemExit as e:  # runkit's one-line "error: ..." for a missing or bad checkpoint
        raise ValueError(str(e.code).removeprefix("error: ")) from None
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{run_path}: no readable checkpoint ({e})") from None
    fields = {f.name for f in dataclasses.fields(module.Args)}
    args = module.Args(**{k: v for k, v in ckpt["args"].items() if k in fields})
    # one agent of a seed stack, evaluated as the single-seed run of its seed (the analysis tools' slicing)
    args, params = select_seed(run_path, args, ckpt["params"]["actor"], run_seed)
    act = POLICY_BUILDERS[script](module, args)
    return Policy(
        run_path=run_path,
        script=script,
        module=module,
        args=args,
        act=act,
        params=params,
        epoch=int(ckpt["epoch"]),
        env_steps=int(ckpt.get("env_steps", 0)),
    )


# --- one policy constructor per script: its own network builders and deterministic action ---
def _train_env(args):
    import envs

    return envs.make(args.env)


def _crl_deep(module, args):
    env = _train_env(args)
    nets = module.build_networks(args, env.observation_size, len(env.goal_indices), env.action_size)
    return lambda params, obs: module.deterministic_action(nets.actor, params, obs)


def _actor_first(module, args):  # sac_her, td3_her: build_networks -> (actor, critic)
    actor = module.build_networks(args, _train_env(args).action_size)[0]
    return lambda params, obs: module.deterministic_action(actor, params, obs)


def _gcbc(module, args):
    state_dim, _, action_size = _sizes(module, args)
    policy = module.build_networks(args, action_size, state_dim)  # --no-goal reads only the state part
    return lambda params, obs: module.deterministic_action(policy, params, obs)


def _sizes(module, args):
    """(state_dim, goal_indices, action_size) of the run's env: one of ours, or an OGBench env (goals
    are then whole observations)."""
    import numpy as np

    import envs

    if args.env in envs.ENV_IDS:
        env = _train_env(args)
        return env.state_dim, tuple(int(i) for i in env.goal_indices), env.action_size
    probe = ogbench.make_env(args.env, None)
    state_dim = int(np.prod(probe.observation_space.shape))
    return state_dim, tuple(range(state_dim)), int(probe.action_space.shape[0])


def _offline_crl(module, args):
    state_dim, _, action_dim = _sizes(module, args)
    actor = module.make_networks(args, action_dim)[2]
    return lambda params, obs: module.policy_action(actor, params, obs[..., :state_dim], obs[..., state_dim:])


def _qrl(module, args):
    dims = module.Dims(*_sizes(module, args))
    actor = module.build_networks(args, dims).actor
    if args.mode == "online":  # the tanh-Gaussian actor: tanh(mean) of obs = [state, goal]
        return lambda params, obs: module.deterministic_action(actor, params, obs)
    return lambda params, obs: module.policy_action(
        actor, params, obs[..., : dims.state_dim], obs[..., dims.state_dim :]
    )


# script -> builder(module, args) -> act(params, obs); a new training script adds its entry here
# (and, if its evaluation key is derived differently, a case in run_eval_setup)
POLICY_BUILDERS = {
    "crl_deep": _crl_deep,
    "sac_her": _actor_first,
    "td3_her": _actor_first,
    "gcbc": _gcbc,
    "offline_crl": _offline_crl,
    "qrl": _qrl,
}


# --- what the script's own evaluation after epoch `epoch` used ---
def run_eval_setup(policy: Policy) -> dict:
    """env id, episodes, episode length and (for envs/ ids) the jax key of the run's own evaluation
    after the checkpoint's epoch. The key derivations mirror the scripts' main blocks."""
    import jax

    import envs

    a, epoch = policy.args, policy.epoch
    if policy.script == "gcbc" and a.mode == "offline" and a.env not in envs.ENV_IDS:  # OGBench: fixed seeds
        return {"env": a.env, "episodes": a.num_eval_envs, "episode_length": a.episode_length, "ogbench_seed": a.seed}
    if policy.script == "offline_crl" or (policy.script == "qrl" and a.mode == "offline"):
        length = a.eval_episode_length or 1000
        if a.env not in envs.ENV_IDS:
            return {
                "env": a.env,
                "episodes": a.eval_episodes,
                "episode_length": a.eval_episode_length,
                "ogbench_seed": a.seed,
            }
        # key, k_init = split(PRNGKey(seed)); then per epoch: key, k_train, k_val, k_eval = split(key, 4)
        key = jax.random.split(jax.random.PRNGKey(a.seed))[0]
        for _ in range(epoch + 1):
            key, _, _, k_eval = jax.random.split(key, 4)
        return {"env": envs.eval_variant(a.env), "episodes": a.eval_episodes, "episode_length": length, "key": k_eval}
    if policy.script == "qrl":  # online: fold_in(PRNGKey(seed + 1), epoch)
        k_eval_base = jax.random.PRNGKey(a.seed + 1)
    else:  # crl_deep, sac_her, td3_her, gcbc: key, k_init, k_reset, k_eval_base = split(PRNGKey(seed), 4)
        k_eval_base = jax.random.split(jax.random.PRNGKey(a.seed), 4)[3]
    return {
        "env": a.eval_env or envs.eval_variant(a.env),
        "episodes": a.num_eval_envs,
        "episode_length": a.episode_length,
        "key": jax.random.fold_in(k_eval_base, epoch),
    }


def evaluate(
    run_path: str,
    env_id: str | None = None,
    episodes: int | None = None,
    seed: int | None = None,
    video: str | None = None,
    run_seed: int | None = None,
) -> dict:
    """The paper's metrics of the run's deterministic policy, named as in metrics.jsonl (`eval/...`)."""
    import jax

    import envs

    if episodes is not None and episodes < 1:
        raise ValueError("--episodes must be >= 1")
    policy = load_policy(run_path, run_seed)
    setup = run_eval_setup(policy)
    own = env_id is None and episodes is None and seed is None
    env_id = env_id or setup["env"]
    episodes = episodes or setup["episodes"]
    out = {
        "run": policy.run_path,
        "script": policy.script,
        "epoch": policy.epoch,
        "env_steps": policy.env_steps,
        "env": env_id,
        "episodes": episodes,
    }
    if "ogbench_seed" in setup:  # offline_crl / qrl / gcbc on an OGBench env: the script's own loop
        if video:
            raise ValueError("--video renders envs/ ids only; this run is evaluated on OGBench")
        a = policy.args
        try:
            eval_envs = [ogbench.make_env(env_id, setup["episode_length"]) for _ in range(episodes)]
        except Exception as e:  # gymnasium raises several types for unknown names
            raise ValueError(f"--env {env_id!r}: not an OGBench env ({type(e).__name__}: {e})") from None
        act = jax.jit(lambda params, obs, goals: policy.act(params, jax.numpy.concatenate([obs, goals], -1)))
        metrics = ogbench.evaluate(eval_envs, lambda o, g: act(policy.params, o, g), a.seed if seed is None else seed)
        out["key"] = "run" if seed is None else f"seed {seed}"
    else:
        if env_id not in envs.ENV_IDS:
            raise ValueError(f"unknown env {env_id!r}; valid: {', '.join(envs.ENV_IDS)}")
        env = envs.make(env_id)
        train_env = envs.make(policy.args.env)
        if (env.observation_size, env.action_size) != (train_env.observation_size, train_env.action_size):
            raise ValueError(
                f"--env {env_id}: observations {env.observation_size} / actions {env.action_size}; the "
                f"run's policy takes {train_env.observation_size} / {train_env.action_size}"
            )
        key = setup["key"] if seed is None else jax.random.PRNGKey(seed)
        length = setup["episode_length"]
        # the scripts' own evaluate_policy: a jitted envs.evaluate with the actor's params as the argument
        evaluate_fn = jax.jit(
            lambda params, key: envs.evaluate(env, lambda obs: policy.act(params, obs), key, episodes, length)
        )
        metrics = jax.device_get(evaluate_fn(policy.params, key))
        out["key"] = "run" if seed is None else f"seed {seed}"
        out["episode_length"] = length
        if video:
            out["video"] = render_video(policy, env, key, episodes, length, video)
    if run_seed is not None:
        out["run_seed"] = run_seed
    out["same_as_run"] = own  # True: the evaluation the run logged for this epoch, repeated
    out.update({f"eval/{k}": float(v) for k, v in metrics.items()})
    return out


def render_video(policy: Policy, env, key, episodes: int, length: int, path: str) -> dict:
    """Renders the evaluated episode with the most steps at the goal (tools/video.py's code path)."""
    import numpy as np

    from tools.agent import best_episode, rollout
    from tools.render import render_frames, write_video

    agent = _RolloutAgent(policy)
    traj = rollout(env, agent, key, episodes, length)  # same resets as envs.evaluate: split(key, episodes)
    i = best_episode(traj)
    last = int(np.nonzero(traj["alive"][:, i])[0][-1])
    every = 2
    idx = np.arange(0, last + 1, every)
    scene_box = None
    if hasattr(env, "maze"):
        n_rows, n_cols, scale = len(env.maze.rows), len(env.maze.rows[0]), env.maze.scale
        scene_box = (((n_rows - 1) * scale / 2, (n_cols - 1) * scale / 2, 0.0), max(n_rows, n_cols) * scale)
    frames = render_frames(
        env.sys.mj_model,
        traj["qpos"][idx, i],
        traj["obs"][idx, i, env.state_dim :],
        env.goal_reach_thresh,
        640,
        480,
        "auto",
        scene_box=scene_box,
    )
    write_video(frames, path, 1.0 / (env.dt * every))
    # the episode's own `episode_success`: steps (after the reset) at the goal while not yet terminated
    steps_at_goal = (traj["success"][1:, i] * traj["alive"][:-1, i]).sum()
    return {"path": path, "episode": i, "frames": len(frames), "steps_at_goal": int(steps_at_goal)}


@dataclass
class _RolloutAgent:
    """Adapts a Policy to tools.agent.rollout (which calls .params, .with_params(p).act(obs))."""

    policy: Policy

    @property
    def params(self):
        return self.policy.params

    def with_params(self, params):
        return _RolloutAgent(self.policy.with_params(params))

    def act(self, obs):
        return self.policy(obs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder (config.json + the script's checkpoint)")
    parser.add_argument("--env", default=None, help="env id to evaluate on; default: the run's eval env")
    parser.add_argument(
        "--episodes", type=int, default=None, help="episodes (one per eval env; OGBench: per task); default: the run's"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="evaluation key PRNGKey(SEED); default: the key the run used for this epoch",
    )
    parser.add_argument(
        "--run-seed", type=int, default=None, help="which seed of a --num-seeds run to evaluate (required there)"
    )
    parser.add_argument("--video", default=None, help="also render the best evaluated episode (.mp4 or .gif)")
    args = parser.parse_args(argv)
    if args.video:  # the OpenGL backend must be chosen before anything imports mujoco
        from tools.render import setup_gl

        try:
            setup_gl()
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        result = evaluate(args.run, args.env, args.episodes, args.seed, args.video, args.run_seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
