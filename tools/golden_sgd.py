"""Checks crl_deep's SGD step against one recorded from the paper's own train.py.

    python -m tools.golden_sgd tests/golden_sgd/*.npz [--effects]

A file holds the paper code's initial parameters, a batch, the policy's normal draw, and what its
`sgd_step` computed: losses, logits, gradients, the parameters after Adam (tests/golden_sgd/README.md).
The reference's parameters are loaded into crl_deep's own networks (flax auto-names in creation
order mapped by layer order; the residual blocks stacked as `nn.scan` wants them), crl_deep's own
`critic_loss`, `actor_loss` and `sgd_step` run on the file's batch with the file's noise, and every
quantity is compared. Depths (actor and critic may differ), width and batch come from the file.

Prints one JSON line per file (`file`, `ok`, each quantity's error and its tolerance), then
`N/M files match the paper's SGD step`; exits 0 only if all match. --effects adds, per file, the size
of crl_deep's documented deviations from the paper's step (docs/crl_deep.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too
import crl_deep as C

# The tolerances of the files' README, or tighter where measured (docs/crl_deep.md has the figures).
# "rel" errors are max |ours - ref| / max |ref| per tensor (the worst tensor); "abs" plain max |ours - ref|.
TOLERANCES = {
    "critic_loss": 1e-5,
    "logits": 1e-5,
    "critic_grads_rel": 1e-4,
    "critic_after": 1e-6,  # where |g| > 1e-5: Adam's first step is lr * sign(g), so this checks every sign
    "alpha_after": 1e-6,
    # the actor's Q path, checked tightly on a no-entropy file
    "actor_loss_noentropy": 1e-5,
    "actor_grads_rel_noentropy": 1e-4,
    "actor_after_noentropy": 1e-6,
    # with the entropy term: float32 rounding of log(1 - tanh(x)^2 + 1e-6) in the paper's own step
    "actor_loss": 2e-2,
    "log_prob_well_conditioned": 1e-3,
    "actor_grads_rel": 0.25,
    "alpha_loss": 2e-2,
    "alpha_grad": 2e-2,
}
GRAD_FLOOR = 1e-5  # after-params are compared only where the reference gradient exceeds this
WELL_CONDITIONED = 1e-3  # rows whose every action has 1 - a^2 above this


def load(path: str) -> dict:
    """The file's arrays by key. A `_noentropy` file holds no initial parameters: they are those of the
    file without that suffix in the same folder (same seeds), read from there."""
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    if not any(k.startswith("init/actor/") for k in data):
        base = path.replace("_noentropy", "")
        if base == path or not os.path.isfile(base):
            raise ValueError(f"{path}: holds no init/actor parameters and has no base file beside it")
        with np.load(base) as f:
            data.update({k: f[k] for k in f.files if k.startswith("init/")})
    return data


def reference_tree(data: dict, prefix: str) -> dict:
    """{layer name: {kernel|bias|scale: array}} of the flax params under `prefix` (e.g. init/actor/params)."""
    tree = {}
    for key, value in data.items():
        if key.startswith(prefix + "/"):
            layer, leaf = key[len(prefix) + 1 :].split("/")
            tree.setdefault(layer, {})[leaf] = value
    return tree


def to_ours(ref: dict, depth: int, heads: tuple) -> dict:
    """A reference module's params as crl_deep's: Dense_0/LayerNorm_0 the input layer, Dense_{4b+j+1}
    (and its LayerNorm) the j-th layer of residual block b, then the heads in order."""
    blocks = depth // 4
    stack = lambda kind, j: {
        leaf: np.stack([ref[f"{kind}_{4 * b + j + 1}"][leaf] for b in range(blocks)]) for leaf in ref[f"{kind}_{j + 1}"]
    }
    tower = {"Dense_0": ref["Dense_0"], "LayerNorm_0": ref["LayerNorm_0"], "blocks": {}}
    for j in range(4):
        tower["blocks"][f"Dense_{j}"] = stack("Dense", j)
        tower["blocks"][f"LayerNorm_{j}"] = stack("LayerNorm", j)
    out = {"tower": tower}
    for i, name in enumerate(heads):
        out[name] = ref[f"Dense_{4 * blocks + 1 + i}"]
    expected = 4 * blocks + 1 + len(heads)
    if len([k for k in ref if k.startswith("Dense_")]) != expected:
        raise ValueError(f"{len(ref)} reference layers do not make a depth-{depth} tower with heads {heads}")
    return {"params": jax.tree_util.tree_map(jnp.asarray, out)}


def module_params(data: dict, stage: str, depth_actor: int, depth_critic: int) -> dict:
    """crl_deep's params {"actor", "sa_encoder", "g_encoder"} of the file's `stage` (init, after, grads)."""
    out = {}
    if any(k.startswith(f"{stage}/actor/") for k in data):
        out["actor"] = to_ours(reference_tree(data, f"{stage}/actor/params"), depth_actor, ("mean", "log_std"))
    for name in ("sa_encoder", "g_encoder"):
        if any(k.startswith(f"{stage}/critic/{name}/") for k in data):
            out[name] = to_ours(reference_tree(data, f"{stage}/critic/{name}/params"), depth_critic, ("head",))
    return out


def args_of(data: dict) -> C.Args:
    """crl_deep's Args of the file's run (the paper's defaults elsewhere: l2 energy, InfoNCE, LayerNorm, swish)."""
    meta = lambda k: data[f"meta/{k}"].item()
    lr = float(meta("lr"))
    return C.Args(
        depth=int(meta("critic_depth")),
        actor_depth=int(meta("actor_depth")),
        critic_depth=int(meta("critic_depth")),
        width=int(meta("width")),
        repr_dim=int(meta("repr_dim")),
        batch_size=int(meta("batch_size")),
        logsumexp_coef=float(meta("logsumexp_penalty_coeff")),
        target_entropy=float(meta("target_entropy")),
        disable_entropy=bool(meta("disable_entropy")),
        actor_lr=lr,
        critic_lr=lr,
        alpha_lr=lr,
    )


def max_rel(ours: dict, ref: dict) -> float:
    """The worst tensor's max |ours - ref| / max |ref|."""
    errs = jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-30)), ours, ref
    )
    return max(jax.tree_util.tree_leaves(errs))


def max_abs_where(ours: dict, ref: dict, grads: dict) -> float:
    """max |ours - ref| over elements whose reference gradient exceeds GRAD_FLOOR."""
    errs = jax.tree_util.tree_map(
        lambda a, b, g: float(np.max(np.where(np.abs(g) > GRAD_FLOOR, np.abs(np.asarray(a) - b), 0.0), initial=0.0)),
        ours,
        ref,
        grads,
    )
    return max(jax.tree_util.tree_leaves(errs))


def ours_on(data: dict, args: C.Args) -> dict:
    """crl_deep's losses, logits, gradients and one whole sgd_step on the file's params, batch and noise."""
    meta = lambda k: int(data[f"meta/{k}"].item())
    obs_dim = meta("obs_dim")
    step = compiled_step(args, obs_dim, meta("goal_end_idx") - meta("goal_start_idx"), meta("action_size"))
    params = module_params(data, "init", args.actor_depth, args.critic_depth)
    obs = jnp.asarray(data["batch/observation"])
    batch = {"state": obs[:, :obs_dim], "action": jnp.asarray(data["batch/action"]), "goal": obs[:, obs_dim:]}
    return jax.device_get(step(params, jnp.asarray(data["init/alpha/log_alpha"]), batch, data["rng/actor_noise"]))


@functools.cache
def compiled_step(args: C.Args, state_dim: int, goal_size: int, action_size: int):
    """jit(params, log_alpha, batch, noise) -> crl_deep's quantities: built once per configuration."""
    nets = C.build_networks(args, state_dim + goal_size, goal_size, action_size)
    optimizers = C.make_optimizers(args)

    @jax.jit
    def run(params, log_alpha, batch, noise):
        critic = {k: params[k] for k in ("sa_encoder", "g_encoder")}
        train_state = {
            "params": params,
            "actor_opt_state": optimizers.actor.init(params["actor"]),
            "critic_opt_state": optimizers.critic.init(critic),
            "log_alpha": log_alpha,
            "alpha_opt_state": optimizers.alpha.init(log_alpha),
        }
        (c_loss, (logits, g_repr)), c_grads = jax.value_and_grad(C.critic_loss, has_aux=True)(
            critic, batch["state"], batch["action"], batch["goal"], nets, args
        )
        (a_loss, log_prob), a_grads = jax.value_and_grad(C.actor_loss, has_aux=True)(
            params["actor"],
            params["sa_encoder"],
            g_repr,
            batch["state"],
            batch["goal"],
            jnp.exp(log_alpha),
            None,
            nets,
            args,
            noise,
        )
        target = C.target_entropy(args, action_size)
        al_loss, al_grad = jax.value_and_grad(C.alpha_loss)(log_alpha, log_prob, target)
        new_state, _ = C.sgd_step(train_state, batch, None, nets, optimizers, args, actor_noise=noise)
        return {
            "critic_loss": c_loss,
            "logits": logits,
            "critic_grads": c_grads,
            "actor_loss": a_loss,
            "log_prob": log_prob,
            "actor_grads": a_grads,
            "alpha_loss": al_loss,
            "alpha_grad": al_grad,
            "after": new_state["params"],
            "log_alpha_after": new_state["log_alpha"],
        }

    return run


def check(path: str, effects: bool = False) -> dict:
    """One file's comparison: {"file", "ok", quantity: {"error", "tolerance"}, ...}."""
    data = load(path)
    args = args_of(data)
    ours = ours_on(data, args)
    grads = module_params(data, "grads", args.actor_depth, args.critic_depth)
    after = module_params(data, "after", args.actor_depth, args.critic_depth)
    has_critic = "sa_encoder" in grads
    suffix = "_noentropy" if args.disable_entropy else ""
    errors = {}
    if has_critic:
        critic = {k: grads[k] for k in ("sa_encoder", "g_encoder")}
        errors["critic_loss"] = abs(float(ours["critic_loss"]) - float(data["metrics/critic_loss"]))
        errors["logits"] = float(np.max(np.abs(ours["logits"] - data["capture/critic/logits"])))
        errors["critic_grads_rel"] = max_rel({k: ours["critic_grads"][k] for k in critic}, critic)
        errors["critic_after"] = max_abs_where(
            {k: ours["after"][k] for k in critic}, {k: after[k] for k in critic}, critic
        )
    errors[f"actor_loss{suffix}"] = abs(float(ours["actor_loss"]) - float(data["metrics/actor_loss"]))
    errors[f"actor_grads_rel{suffix}"] = max_rel(ours["actor_grads"], grads["actor"])
    if args.disable_entropy:  # the entropy-on actor's signs can flip where its gradients are loose
        errors["actor_after_noentropy"] = max_abs_where(ours["after"]["actor"], after["actor"], grads["actor"])
    well = np.min(1 - data["capture/actor/action"] ** 2, axis=-1) > WELL_CONDITIONED
    errors["log_prob_well_conditioned"] = float(
        np.max(np.abs(-ours["log_prob"] - data["metrics/sample_entropy"])[well], initial=0.0)
    )
    errors["alpha_loss"] = abs(float(ours["alpha_loss"]) - float(data["metrics/alph_aloss"]))
    errors["alpha_grad"] = abs(float(ours["alpha_grad"]) - float(data["grads/alpha/log_alpha"]))
    errors["alpha_after"] = abs(float(ours["log_alpha_after"]) - float(data["after/alpha/log_alpha"]))
    report = {"file": os.path.basename(path)}
    report["ok"] = all(errors[k] <= TOLERANCES[k] for k in errors)
    report["actor_goal_is_observation_goal"] = bool(
        np.array_equal(
            data["batch/observation"][:, int(data["meta/obs_dim"]) :],
            data["batch/extras/future_state"][:, int(data["meta/goal_start_idx"]) : int(data["meta/goal_end_idx"])],
        )
    )
    report["well_conditioned_rows"] = int(well.sum())
    report.update({k: {"error": v, "tolerance": TOLERANCES[k]} for k, v in errors.items()})
    if effects and has_critic:
        report["effects"] = deviation_effects(data, args, ours)
    return report


def deviation_effects(data: dict, args: C.Args, ours: dict) -> dict:
    """How much each of crl_deep's deviations from the paper's step moves the results on this file:
    SQRT_EPS inside the distance's square root (the paper's code has none), and the logsumexp penalty
    without the paper's +1e-6 shift (logsumexp(L + 1e-6) = logsumexp(L) + 1e-6)."""
    saved = C.SQRT_EPS
    C.SQRT_EPS = 0.0  # read when traced: a fresh trace
    compiled_step.cache_clear()
    try:
        no_eps = ours_on(data, args)
    finally:
        C.SQRT_EPS = saved
        compiled_step.cache_clear()
    lse = jax.nn.logsumexp(jnp.asarray(ours["logits"]), axis=1)
    shift = float(args.logsumexp_coef * (jnp.mean((lse + 1e-6) ** 2) - jnp.mean(lse**2)))
    return {
        "sqrt_eps_logits": float(np.max(np.abs(ours["logits"] - no_eps["logits"]))),
        "sqrt_eps_critic_loss": abs(float(ours["critic_loss"] - no_eps["critic_loss"])),
        "sqrt_eps_critic_grads_rel": max_rel(ours["critic_grads"], no_eps["critic_grads"]),
        "sqrt_eps_actor_loss": abs(float(ours["actor_loss"] - no_eps["actor_loss"])),
        "lse_shift_critic_loss": abs(shift),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="golden SGD-step files (.npz)")
    parser.add_argument("--effects", action="store_true", help="also measure crl_deep's documented deviations")
    ns = parser.parse_args(argv)
    matched = 0
    for path in ns.files:
        try:
            report = check(path, ns.effects)
        except (OSError, ValueError, KeyError) as e:
            report = {"file": os.path.basename(path), "ok": False, "error": f"{type(e).__name__}: {e}"}
        matched += report["ok"]
        print(json.dumps(report), flush=True)
    print(f"{matched}/{len(ns.files)} files match the paper's SGD step")
    return 0 if matched == len(ns.files) else 1


if __name__ == "__main__":
    sys.exit(main())
