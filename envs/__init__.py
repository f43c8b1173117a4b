"""The benchmark: goal-conditioned Brax/MJX environments, shared by every algorithm script.

    import envs
    env = envs.make("ant_u_maze")          # a brax PipelineEnv, obs = concat[state, goal]
    state = env.reset_to(q, qd, goal)      # a reset's State from a given physical state and goal
    train_env = envs.wrap_for_training(env, episode_length=1000)

Importing this package fixes the known brax 0.10.1 defects under mujoco 3.2.6 (see patches.py).
"""

from __future__ import annotations

import importlib

from envs import patches as _patches

_patches.apply()

from envs.wrappers import evaluate, wrap_for_training  # noqa: E402

# id -> (module, factory, fixed kwargs). Modules are imported lazily: building one env never
# pays for the others' imports.
_REGISTRY: dict[str, tuple[str, str, dict]] = {
    "reacher": ("envs.reacher", "Reacher", {}),
    "ant": ("envs.ant", "Ant", {}),
    "humanoid": ("envs.humanoid", "Humanoid", {}),
    "arm_push_easy": ("envs.arm", "ArmPushEasy", {}),
    "arm_push_hard": ("envs.arm", "ArmPushHard", {}),
    "arm_binpick_hard": ("envs.arm", "ArmBinpickHard", {}),
    # Stitching variant of the ant U-maze (paper Fig. 11): train on goals at most 3 path cells
    # from the start, evaluate at path distance 4-6 (never seen in training).
    "ant_u_maze_stitch": ("envs.maze", "make_maze", {"robot": "ant", "layout": "U", "stitching": "train"}),
    "ant_u_maze_stitch_eval": ("envs.maze", "make_maze", {"robot": "ant", "layout": "U", "stitching": "eval"}),
}
_MAZES = {
    "ant": {"u": "U", "u4": "U4", "u5": "U5", "big": "BIG", "hardest": "HARDEST"},
    "humanoid": {"u": "U", "big": "BIG", "hardest": "HARDEST"},
}
for _robot, _layouts in _MAZES.items():
    for _name, _layout in _layouts.items():
        _REGISTRY[f"{_robot}_{_name}_maze"] = ("envs.maze", "make_maze", {"robot": _robot, "layout": _layout})
        if _layout != "HARDEST":  # the paper's code has no eval layout for HARDEST
            _REGISTRY[f"{_robot}_{_name}_maze_eval"] = (
                "envs.maze",
                "make_maze",
                {"robot": _robot, "layout": _layout, "eval": True},
            )

ENV_IDS: tuple[str, ...] = tuple(sorted(_REGISTRY))


def eval_variant(env_id: str) -> str:
    """The id used for evaluation by default: the `_eval` variant where one exists."""
    return f"{env_id}_eval" if f"{env_id}_eval" in _REGISTRY else env_id


def make(env_id: str, **options):
    """Builds the environment `env_id`; options go to its constructor (e.g. backend=...)."""
    if env_id not in _REGISTRY:
        raise ValueError(f"unknown env id {env_id!r}; valid ids: {', '.join(ENV_IDS)}")
    module, factory, fixed = _REGISTRY[env_id]
    clash = set(fixed) & set(options)
    if clash:
        raise ValueError(f"option(s) {sorted(clash)} are fixed by env id {env_id!r}")
    return getattr(importlib.import_module(module), factory)(**fixed, **options)


__all__ = ["ENV_IDS", "make", "eval_variant", "wrap_for_training", "evaluate"]
