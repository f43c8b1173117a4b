"""Training and evaluation wrappers (in progress; see docs/conventions.md for the API)."""


def wrap_for_training(env, episode_length=1000, cached_reset=False):
    raise NotImplementedError


def evaluate(env, act_fn, key, num_envs, episode_length=1000):
    raise NotImplementedError
