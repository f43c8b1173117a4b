"""Bad input: one line `error: ...` on stderr (exit 1), before anything is compiled or written."""

from __future__ import annotations

import dataclasses

# Range rules by flag name; each script's Args has a subset of these flags.
POSITIVE = (
    "width", "repr_dim", "latent_dim", "iqe_component_dim", "batch_size", "num_envs", "num_eval_envs",
    "episode_length", "num_epochs", "unroll_length", "sgd_steps_per_train_step", "replay_size", "min_replay_size",
    "scan_unroll", "train_steps", "eval_every", "eval_episodes", "eval_episode_length", "policy_delay", "num_seeds",
)  # fmt: skip
NON_NEGATIVE = ("logsumexp_coef", "alpha", "target_noise", "target_noise_clip", "exploration_noise")


def fail(message: str):
    """Stops with one line "error: ..." on stderr (exit code 1); in-process callers (tools/grid.py) read
    the message from SystemExit.code."""
    raise SystemExit(f"error: {message}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_common(args):
    """The range checks every script shares, by flag name: depths a positive multiple of 4, counts and
    learning rates > 0, penalties and noises >= 0, discount in (0, 1), tau in (0, 1], her_ratio in [0, 1],
    and (online) the replay sizes against the unroll, the episode and the batch."""
    config = dataclasses.asdict(args)
    for name in ("depth", "actor_depth", "critic_depth"):
        value = config.get(name)
        if value is not None and (value <= 0 or value % 4):
            fail(f"{flag(name)} must be a positive multiple of 4 (got {value})")
    for name, value in config.items():
        if value is None or isinstance(value, (str, bool)):
            continue
        if (name in POSITIVE or name.endswith("_lr") or name == "learning_rate") and not value > 0:
            fail(f"{flag(name)} must be positive (got {value})")
        if name in NON_NEGATIVE and not value >= 0:
            fail(f"{flag(name)} must be non-negative (got {value})")
        if name == "discount" and not 0.0 < value < 1.0:
            fail(f"--discount must be in (0, 1) (got {value})")
        if name == "tau" and not 0.0 < value <= 1.0:
            fail(f"--tau must be in (0, 1] (got {value})")
        if name == "her_ratio" and not 0.0 <= value <= 1.0:
            fail(f"--her-ratio must be in [0, 1] (got {value})")
    if "replay_size" in config and config.get("mode", "online") == "online":
        if args.min_replay_size > args.replay_size:
            fail(f"--min-replay-size {args.min_replay_size} exceeds --replay-size {args.replay_size} (steps per env)")
        if args.unroll_length > args.replay_size:
            fail(f"--unroll-length {args.unroll_length} exceeds --replay-size {args.replay_size} (steps per env)")
        if args.unroll_length > args.episode_length:
            fail(f"--unroll-length {args.unroll_length} exceeds --episode-length {args.episode_length}")
        if args.batch_size > args.num_envs * args.min_replay_size:
            fail(
                f"--batch-size {args.batch_size} is larger than the buffer holds when training starts "
                f"(num-envs x min-replay-size = {args.num_envs * args.min_replay_size})"
            )
