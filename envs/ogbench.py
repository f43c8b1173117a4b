"""The offline benchmark: OGBench-format datasets and OGBench's own evaluation (Park et al., 2024).

    from envs import ogbench
    data = ogbench.load_dataset("data/pointmaze-medium-navigate-v0.npz")   # checked, trajectories whole
    transition_rows, traj_end = ogbench.index_trajectories(data["terminals"])
    eval_envs = [ogbench.make_env("pointmaze-medium-navigate-v0", None) for _ in range(5)]
    metrics = ogbench.evaluate(eval_envs, act, seed=0)                     # task1..5_success, success

A dataset is an `.npz` with `observations` [N, D], `actions` [N, A] and `terminals` [N] (1 on the last
row of each trajectory, whose action has no recorded next state), as OGBench writes them and as
crl_deep.py's --save-buffer writes its replay buffer. The `ogbench` package (its gymnasium envs) is
imported only by `make_env` and `is_dataset_id`.

An offline script (offline_crl.py, qrl.py --mode offline) takes its inputs and its evaluation from here:

    dataset, val_dataset, eval_env, goal_indices = ogbench.load_inputs(path, env_name, episode_length)
    evaluate = ogbench.make_evaluator(env_name, eval_env, act, episodes, episode_length, seed)
    metrics = evaluate(actor_params, key)          # act(params, observations, goals) -> actions

where `env_name` is an OGBench env (or dataset) name or one of our `envs/` ids.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np


def load_dataset(path: str) -> dict:
    """Reads an OGBench-format npz and checks it. Rows after the last terminal (an unfinished trajectory)
    are dropped. Raises ValueError with one clear line on a bad file."""
    try:
        with np.load(path) as f:
            raw = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in ("observations", "actions", "terminals") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; an OGBench dataset has observations, actions, terminals")
    obs, actions, terminals = raw["observations"], raw["actions"], raw["terminals"]
    if obs.ndim != 2 or actions.ndim != 2 or terminals.ndim != 1:
        raise ValueError(
            f"{path}: expected observations [N, D], actions [N, A], terminals [N]; got shapes "
            f"{obs.shape}, {actions.shape}, {terminals.shape}"
        )
    lengths = {k: len(raw[k]) for k in ("observations", "actions", "terminals", "qpos", "qvel") if k in raw}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: mismatched lengths {lengths}")
    for k in ("observations", "actions"):
        if not np.issubdtype(raw[k].dtype, np.number) or not np.all(np.isfinite(raw[k])):
            raise ValueError(f"{path}: {k} contain NaN/inf or non-numbers")
    if not np.all((terminals == 0) | (terminals == 1)):
        raise ValueError(f"{path}: terminals must be 0 or 1")
    ends = np.flatnonzero(terminals)
    if len(ends) == 0 or np.max(np.diff(np.concatenate([[-1], ends]))) < 2:
        raise ValueError(f"{path}: no complete trajectory (a terminal row after at least one transition)")
    n = ends[-1] + 1
    return {
        "observations": obs[:n].astype(np.float32),
        "actions": actions[:n].astype(np.float32),
        "terminals": terminals[:n].astype(np.float32),
    }


def index_trajectories(terminals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(transition_rows, traj_end). A trajectory is the rows up to and including a terminal row; row t is a
    transition (s_t, a_t, s_{t+1}) unless it is a terminal row. traj_end[t] is the last row of t's
    trajectory: future goals of t are rows t+1 .. traj_end[t]."""
    ends = np.flatnonzero(terminals)
    traj_end = ends[np.searchsorted(ends, np.arange(len(terminals)))]
    transition_rows = np.flatnonzero(terminals == 0)
    return transition_rows.astype(np.int32), traj_end.astype(np.int32)


def is_dataset_id(name: str) -> bool:
    """A goal-conditioned OGBench dataset id (`<env>-<dataset type>-v<n>`) whose env OGBench registers."""
    splits = name.split("-")
    if len(splits) < 3 or "singletask" in splits or "oraclerep" in splits:
        return False
    try:
        import gymnasium
        import ogbench  # noqa: F401 (registers the OGBench envs with gymnasium)
    except ImportError:
        return False
    return "-".join(splits[:-2] + splits[-1:]) in gymnasium.registry


def make_env(name: str, episode_length: Optional[int]):
    """OGBench's evaluation env of a dataset or env name (gymnasium), episodes cut at `episode_length` if set."""
    import ogbench

    kwargs = {} if episode_length is None else {"max_episode_steps": episode_length}
    return ogbench.make_env_and_datasets(name, env_only=True, **kwargs)


def evaluate(eval_envs, act, seed: int) -> dict:
    """Success rate per task (OGBench's evaluation tasks, ids 1..5), one episode per env in `eval_envs` run
    in lockstep; act(observations [n, D], goals [n, D]) -> actions. An episode succeeds if info['success']
    is 1 at any step. Seeds are fixed, so every evaluation of a run sees the same start noise."""
    metrics, all_success, all_length = {}, [], []
    for task in range(1, len(eval_envs[0].unwrapped.task_infos) + 1):
        obs, goals = [], []
        for i, env in enumerate(eval_envs):
            ob, info = env.reset(seed=seed * 100_000 + task * 1000 + i, options={"task_id": task})
            obs.append(ob)
            goals.append(info["goal"])
        obs, goals = np.asarray(obs, np.float32), np.asarray(goals, np.float32)
        active = np.ones(len(eval_envs), bool)
        success = np.zeros(len(eval_envs))
        length = np.zeros(len(eval_envs))
        while active.any():
            actions = np.asarray(act(obs, goals))
            for i in np.flatnonzero(active):
                ob, _, terminated, truncated, info = eval_envs[i].step(actions[i])
                obs[i] = ob
                length[i] += 1
                success[i] = max(success[i], float(info["success"]))
                active[i] = not (terminated or truncated)
        metrics[f"task{task}_success"] = float(success.mean())
        all_success.append(success.mean())
        all_length.append(length.mean())
    metrics["success"] = float(np.mean(all_success))
    metrics["episode_length"] = float(np.mean(all_length))
    return metrics


def load_inputs(path: str, env_name: str, episode_length: Optional[int], fail=None):
    """(dataset, its `-val.npz` twin or None, the evaluation env, the goal indices) of an offline run, checked
    against each other before anything compiles. `env_name` is one of our envs/ ids (the env is its `_eval`
    variant; goals are its goal_indices) or an OGBench env (`make_env(env_name, episode_length)`; goals are
    whole observations). Raises ValueError with one line, naming --dataset or --env, on a bad input; with
    `fail` (a script passes runkit.fail) calls fail(that line) instead."""
    try:
        return _checked_inputs(path, env_name, episode_length)
    except ValueError as e:
        if fail is None:
            raise
        fail(str(e))


def _checked_inputs(path: str, env_name: str, episode_length: Optional[int]):
    import envs

    if not os.path.isfile(path):
        raise ValueError(f"--dataset {path!r} does not exist")
    val_path = path[: -len(".npz")] + "-val.npz" if path.endswith(".npz") else ""
    dataset = load_dataset(path)
    val_dataset = load_dataset(val_path) if os.path.isfile(val_path) else None
    obs_dim, action_dim = dataset["observations"].shape[1], dataset["actions"].shape[1]
    if env_name in envs.ENV_IDS:
        eval_env = envs.make(envs.eval_variant(env_name))
        env_sizes, goal_indices = (eval_env.state_dim, eval_env.action_size), tuple(map(int, eval_env.goal_indices))
    else:
        try:
            eval_env = make_env(env_name, episode_length)
        except Exception as e:  # gymnasium raises several types for unknown names
            raise ValueError(f"--env {env_name!r} is neither one of our envs/ ids nor an OGBench env ({e})") from None
        env_sizes = (eval_env.observation_space.shape[0], eval_env.action_space.shape[0])
        goal_indices = tuple(range(obs_dim))
    if env_sizes != (obs_dim, action_dim):
        raise ValueError(
            f"dataset has observations of size {obs_dim} and actions of size {action_dim}; env {env_name!r} "
            f"has {env_sizes[0]} and {env_sizes[1]}"
        )
    if val_dataset is not None and (val_dataset["observations"].shape[1], val_dataset["actions"].shape[1]) != env_sizes:
        raise ValueError(f"{val_path}: observation/action sizes differ from {path}")
    return dataset, val_dataset, eval_env, goal_indices


def make_evaluator(env_name: str, eval_env, act, episodes: int, episode_length: Optional[int], seed: int):
    """(actor params, key) -> eval metrics (floats) of the deterministic policy act(params, observations, goals)
    -> actions, on `load_inputs`' eval_env. Our envs/ ids: a jitted `envs.evaluate` of `episodes` envs, one
    episode each of `episode_length` steps (default 1000), from the key. OGBench: `evaluate` on its 5 tasks,
    `episodes` per task, with the fixed seeds of `seed` (the key unused)."""
    import jax

    import envs

    if env_name in envs.ENV_IDS:
        state_dim, length = eval_env.state_dim, episode_length or 1000
        policy = lambda params: lambda obs: act(params, obs[:, :state_dim], obs[:, state_dim:])
        run = jax.jit(lambda params, key: envs.evaluate(eval_env, policy(params), key, episodes, length))
        return lambda params, key: {k: float(v) for k, v in jax.device_get(run(params, key)).items()}
    more = [make_env(env_name, episode_length) for _ in range(episodes - 1)]
    policy = jax.jit(act)
    return lambda params, key: evaluate([eval_env, *more], lambda o, g: policy(params, o, g), seed)
