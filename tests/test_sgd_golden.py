"""crl_deep's SGD step against one recorded from the paper's own train.py (tests/golden_sgd/, README there).

tools/golden_sgd.py loads each file's initial parameters into crl_deep's networks, runs crl_deep's own
losses, gradients and sgd_step on the file's batch with the file's noise, and compares every quantity
(tolerances in the tool). Beyond the three recorded files (width 64, batch 128, equal depths), a plain
jax.numpy transcription of the paper's step, written from the files' README and anchored here to the
recorded files, writes files of the same format at other sizes: actor deeper than the critic, another
width, batch and sizes. crl_deep must match those too, and a file whose layers are out of order must fail.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tools import golden_sgd

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_sgd")
FILES = sorted(glob.glob(os.path.join(GOLDEN, "*.npz")))


@pytest.fixture(scope="module")
def reports():
    """The tool's own command line over the three recorded files: (exit code, printed lines)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = golden_sgd.main(FILES)
    return code, out.getvalue().splitlines()


def test_the_three_recorded_steps_match(reports):
    code, lines = reports
    assert len(FILES) == 3 and code == 0
    assert lines[-1] == "3/3 files match the paper's SGD step"
    by_file = {r["file"]: r for r in map(json.loads, lines[:-1])}
    assert set(by_file) == {os.path.basename(f) for f in FILES}
    for report in by_file.values():
        assert report["ok"] and report["actor_goal_is_observation_goal"]
        for name, value in report.items():
            if isinstance(value, dict):
                assert value["error"] <= value["tolerance"], (report["file"], name)
    # the critic and the no-entropy actor to float32 rounding; crl_deep's critic loss is bit-identical on 4/4
    assert by_file["sgd_actor4_critic4.npz"]["critic_loss"]["error"] == 0.0
    noentropy = by_file["sgd_actor4_critic4_noentropy.npz"]
    assert noentropy["actor_loss_noentropy"]["error"] <= 1e-6
    assert noentropy["actor_grads_rel_noentropy"]["error"] <= 1e-5
    assert "critic_loss" not in noentropy  # that file holds the actor and alpha side only


# ---- a transcription of the paper's step (README of tests/golden_sgd), in plain jax.numpy ---------------
def layer_norm(x, p):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.maximum(jnp.mean(x**2, -1, keepdims=True) - mean**2, 0.0)  # flax's fast variance
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]


def dense(x, p):
    return x @ p["kernel"] + p["bias"]


def reference_module(p, x, depth, heads):
    """Dense_0 -> LN_0 -> swish, depth/4 blocks of 4 x [Dense_k -> LN_k -> swish] + skip, then the heads."""
    swish = lambda h: h * jax.nn.sigmoid(h)
    x = swish(layer_norm(dense(x, p["Dense_0"]), p["LayerNorm_0"]))
    for b in range(depth // 4):
        h = x
        for k in range(4 * b + 1, 4 * b + 5):
            h = swish(layer_norm(dense(h, p[f"Dense_{k}"]), p[f"LayerNorm_{k}"]))
        x = x + h
    return [dense(x, p[f"Dense_{4 * (depth // 4) + 1 + i}"]) for i in range(heads)]


def reference_step(init, batch, noise, m):
    """The paper's losses, gradients and one Adam step (lr m['lr']) from the README's formulas."""
    s, goal, a_data, g_actor = batch["state"], batch["goal"], batch["action"], batch["actor_goal"]
    (da, dc) = m["actor_depth"], m["critic_depth"]

    def critic_loss(critic):
        phi = reference_module(critic["sa_encoder"], jnp.concatenate([s, a_data], -1), dc, 1)[0]
        psi = reference_module(critic["g_encoder"], goal, dc, 1)[0]
        logits = -jnp.sqrt(jnp.sum((phi[:, None] - psi[None]) ** 2, -1))
        lse = jax.nn.logsumexp(logits, axis=1)
        loss = -jnp.mean(jnp.diag(logits) - lse) + m["coef"] * jnp.mean(jax.nn.logsumexp(logits + 1e-6, axis=1) ** 2)
        return loss, logits

    def actor_loss(actor, log_alpha):
        mean, raw = reference_module(actor, jnp.concatenate([s, g_actor], -1), da, 2)
        std = jnp.exp(-5 + 3.5 * (jnp.tanh(raw) + 1))
        x = mean + std * noise
        action = jnp.tanh(x)
        log_prob = jnp.sum(jax.scipy.stats.norm.logpdf(x, mean, std) - jnp.log(1 - action**2 + 1e-6), -1)
        phi = reference_module(init["critic"]["sa_encoder"], jnp.concatenate([s, action], -1), dc, 1)[0]
        psi = reference_module(init["critic"]["g_encoder"], g_actor, dc, 1)[0]
        q = -jnp.sqrt(jnp.sum((phi - psi) ** 2, -1))
        loss = -jnp.mean(q) if m["disable_entropy"] else jnp.mean(jnp.exp(log_alpha) * log_prob - q)
        return loss, (log_prob, action)

    (c_loss, logits), c_grads = jax.value_and_grad(critic_loss, has_aux=True)(init["critic"])
    (a_loss, (log_prob, action)), a_grads = jax.value_and_grad(actor_loss, has_aux=True)(init["actor"], 0.0)
    alpha_loss = lambda la: jnp.exp(la) * jnp.mean(jax.lax.stop_gradient(-log_prob - m["target_entropy"]))
    al_loss, al_grad = jax.value_and_grad(alpha_loss)(init["log_alpha"])
    # Adam's first step: moments 0.1 g and 0.001 g^2, bias-corrected to g and g^2
    adam = lambda p, g: p - m["lr"] * g / (jnp.sqrt(0.001 * g**2 / (1 - 0.999)) + 1e-8)
    return {
        "critic_loss": c_loss,
        "logits": logits,
        "grads": {"critic": c_grads, "actor": a_grads, "alpha": al_grad},
        "after": {
            "critic": jax.tree_util.tree_map(adam, init["critic"], c_grads),
            "actor": jax.tree_util.tree_map(adam, init["actor"], a_grads),
            "alpha": adam(init["log_alpha"], al_grad),
        },
        "actor_loss": a_loss,
        "alpha_loss": al_loss,
        "log_prob": log_prob,
        "action": action,
    }


def flatten(tree, prefix):
    return {f"{prefix}/{'/'.join(str(k.key) for k in path)}": np.asarray(v) for path, v in tree_leaves(tree)}


def tree_leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def random_module(rng, sizes_in, width, depth, head_sizes):
    """Parameters named as the paper's flax modules: U(+-1/sqrt(fan_in)) kernels, zero biases, LN 1/0."""
    p, fan_ins = {}, [sizes_in] + [width] * depth
    for k, fan_in in enumerate(fan_ins):
        p[f"Dense_{k}"] = {"kernel": rng.uniform(-1, 1, (fan_in, width)) / np.sqrt(fan_in), "bias": np.zeros(width)}
        p[f"LayerNorm_{k}"] = {"scale": np.ones(width), "bias": np.zeros(width)}
    for i, size in enumerate(head_sizes):
        p[f"Dense_{depth + 1 + i}"] = {
            "kernel": rng.uniform(-1, 1, (width, size)) / np.sqrt(width),
            "bias": np.zeros(size),
        }
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), p)


def write_file(path, seed, actor_depth, critic_depth, width, batch_size, state_dim, goal, action_size, noentropy=False):
    """A file in the recorded files' format, computed by `reference_step`."""
    rng = np.random.default_rng(seed)
    g0, g1 = goal
    init = {
        "actor": random_module(rng, state_dim + g1 - g0, width, actor_depth, (action_size, action_size)),
        "critic": {
            "sa_encoder": random_module(rng, state_dim + action_size, width, critic_depth, (16,)),
            "g_encoder": random_module(rng, g1 - g0, width, critic_depth, (16,)),
        },
        "log_alpha": np.float32(0.0),
    }
    state = rng.normal(size=(batch_size, state_dim)).astype(np.float32)
    future = rng.normal(size=(batch_size, state_dim)).astype(np.float32)
    batch = {
        "state": state,
        "goal": future[:, g0:g1],
        "actor_goal": future[:, g0:g1],
        "action": rng.uniform(-1, 1, (batch_size, action_size)).astype(np.float32),
    }
    noise = rng.normal(size=(batch_size, action_size)).astype(np.float32)
    meta = dict(
        actor_depth=actor_depth, critic_depth=critic_depth, lr=3e-4, coef=0.1, target_entropy=-0.5 * action_size
    )
    out = jax.device_get(
        jax.jit(lambda i, b, n: reference_step(i, b, n, {**meta, "disable_entropy": noentropy}))(init, batch, noise)
    )
    arrays = {
        **flatten({"params": init["actor"]}, "init/actor"),
        **{
            k: v
            for name in ("sa_encoder", "g_encoder")
            for k, v in flatten({"params": init["critic"][name]}, f"init/critic/{name}").items()
        },
        "init/alpha/log_alpha": init["log_alpha"],
        **flatten({"params": out["grads"]["actor"]}, "grads/actor"),
        **flatten({"params": out["after"]["actor"]}, "after/actor"),
        **{
            k: v
            for name in ("sa_encoder", "g_encoder")
            for k, v in flatten({"params": out["grads"]["critic"][name]}, f"grads/critic/{name}").items()
        },
        **{
            k: v
            for name in ("sa_encoder", "g_encoder")
            for k, v in flatten({"params": out["after"]["critic"][name]}, f"after/critic/{name}").items()
        },
        "grads/alpha/log_alpha": out["grads"]["alpha"],
        "after/alpha/log_alpha": out["after"]["alpha"],
        "batch/observation": np.concatenate([state, batch["goal"]], -1),
        "batch/action": batch["action"],
        "batch/extras/future_state": future,
        "rng/actor_noise": noise,
        "capture/critic/logits": out["logits"],
        "capture/actor/action": out["action"],
        "metrics/critic_loss": out["critic_loss"],
        "metrics/actor_loss": out["actor_loss"],
        "metrics/alph_aloss": out["alpha_loss"],
        "metrics/sample_entropy": -out["log_prob"],
        "meta/actor_depth": actor_depth,
        "meta/critic_depth": critic_depth,
        "meta/width": width,
        "meta/repr_dim": 16,
        "meta/batch_size": batch_size,
        "meta/obs_dim": state_dim,
        "meta/goal_start_idx": g0,
        "meta/goal_end_idx": g1,
        "meta/action_size": action_size,
        "meta/lr": 3e-4,
        "meta/logsumexp_penalty_coeff": 0.1,
        "meta/target_entropy": -0.5 * action_size,
        "meta/disable_entropy": int(noentropy),
    }
    np.savez(path, **arrays)
    return str(path)


def test_the_transcription_is_the_papers_step():
    """Anchors the transcription to the recorded files: its critic and no-entropy actor match them tightly."""
    data = golden_sgd.load(os.path.join(GOLDEN, "sgd_actor4_critic4_noentropy.npz"))
    ref = lambda stage: {
        "actor": golden_sgd.reference_tree(data, f"{stage}/actor/params"),
        "critic": {
            n: golden_sgd.reference_tree(data, f"{stage}/critic/{n}/params") for n in ("sa_encoder", "g_encoder")
        },
    }
    init = {**ref("init"), "log_alpha": data["init/alpha/log_alpha"]}
    obs = data["batch/observation"]
    batch = {"state": obs[:, :29], "goal": obs[:, 29:], "action": data["batch/action"]}
    batch["actor_goal"] = data["batch/extras/future_state"][:, 0:2]
    meta = dict(actor_depth=4, critic_depth=4, lr=3e-4, coef=0.1, target_entropy=-4.0, disable_entropy=True)
    out = jax.jit(lambda i, b, n: reference_step(i, b, n, meta))(init, batch, data["rng/actor_noise"])
    main = golden_sgd.load(os.path.join(GOLDEN, "sgd_actor4_critic4.npz"))
    assert abs(float(out["critic_loss"]) - float(main["metrics/critic_loss"])) <= 1e-5
    np.testing.assert_allclose(out["logits"], main["capture/critic/logits"], atol=1e-5)
    assert abs(float(out["actor_loss"]) - float(data["metrics/actor_loss"])) <= 1e-5
    recorded = golden_sgd.module_params(data, "grads", 4, 4)["actor"]
    ours = golden_sgd.to_ours(jax.device_get(out["grads"]["actor"]), 4, ("mean", "log_std"))
    assert golden_sgd.max_rel(ours, recorded) <= 1e-4


def test_other_depths_widths_and_batches_match_and_a_misordered_file_fails(tmp_path):
    """Actor deeper than the critic, another width, batch, state, goal slice and action size."""
    config = dict(seed=1, actor_depth=8, critic_depth=4, width=32, batch_size=48, state_dim=7, goal=(1, 3))
    path = write_file(tmp_path / "step.npz", **config, action_size=3)
    report = golden_sgd.check(path)
    assert report["ok"], report
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    # the actor's residual blocks 0 and 1 swapped (their first layers): the tool's layer mapping and
    # crl_deep's block order are what this catches
    first, second = (f"init/actor/params/Dense_{k}/kernel" for k in (1, 5))
    data[first], data[second] = data[second], data[first]
    np.savez(tmp_path / "swapped.npz", **data)
    swapped = golden_sgd.check(str(tmp_path / "swapped.npz"))
    assert not swapped["ok"] and swapped["actor_loss"]["error"] > swapped["actor_loss"]["tolerance"]
    # a critic loss off by more than its tolerance fails
    data[first], data[second] = data[second], data[first]
    data["metrics/critic_loss"] = data["metrics/critic_loss"] + np.float32(2e-5)
    np.savez(tmp_path / "off.npz", **data)
    off = golden_sgd.check(str(tmp_path / "off.npz"))
    assert not off["ok"] and [k for k, v in off.items() if isinstance(v, dict) and v["error"] > v["tolerance"]] == [
        "critic_loss"
    ]


def test_a_file_that_is_not_a_golden_step_fails_with_its_reason(tmp_path, capsys):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    assert golden_sgd.main([str(tmp_path / "other.npz")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0])["ok"] is False and "error" in json.loads(lines[0])
    assert lines[-1] == "0/1 files match the paper's SGD step"
