"""--matmul-precision: bfloat16 towers stay close to float32 and really compute in bfloat16; "float32" is
bit-identical to "default" on CPU and really sets the precision; every script accepts the flag.

The loss comparisons run crl_deep.sgd_step from one init on one fixed random batch (depth 8, width 64,
batch 16, the same key per step for both precisions) so the only difference is the towers' Dense dtype.
"""

import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dry_run import CASES, argv_of, dataset  # noqa: F401  (dataset: the fixture the offline cases need)

import crl_deep as C
import runkit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = C.Dims(10, (4, 5, 6), 2)  # reacher's sizes
STEPS = 30
# Largest |loss(bfloat16) - loss(float32)| over the 30 steps, measured on the 2-core CPU machine (jax
# 0.4.35): critic 2.7e-3, actor 1.6e-2 at XLA's backend optimisation level 0 (the test suite's), critic
# 1.8e-3, actor 1.6e-2 at its default level. Both losses start near 3-4; in these 30 steps the critic
# falls to ~0.3 and the actor to ~-0.15. The tolerances are ~3x the larger measured deviation.
CRITIC_TOLERANCE, ACTOR_TOLERANCE = 8e-3, 5e-2


def tiny_args(precision: str, **kw) -> C.Args:
    return C.Args(depth=8, width=64, repr_dim=16, batch_size=16, matmul_precision=precision, **kw)


def fixed_batch(batch_size: int = 16) -> dict:
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    return {
        "state": jax.random.normal(ks[0], (batch_size, DIMS.state_dim)),
        "action": jax.random.uniform(ks[1], (batch_size, DIMS.action_size), minval=-1, maxval=1),
        "goal": jax.random.normal(ks[2], (batch_size, len(DIMS.goal_indices))),
    }


def losses(args: C.Args, steps: int = STEPS):
    """[steps, 2] critic and actor losses of `steps` SGD steps from the seed-0 init, and the final state."""
    nets = C.build_networks(args, 0, 0, DIMS.action_size)
    optimizers = C.make_optimizers(args)
    key = jax.random.PRNGKey(0)
    state = C.init_train_state(key, nets, optimizers, args, DIMS)
    batch = fixed_batch(args.batch_size)
    step = jax.jit(lambda s, b, k: C.sgd_step(s, b, k, nets, optimizers, args))
    out = []
    for i in range(steps):
        state, metrics = step(state, batch, jax.random.fold_in(key, i))
        out.append((float(metrics["critic_loss"]), float(metrics["actor_loss"])))
    return np.array(out), state


@pytest.fixture(scope="module")
def float32_losses():
    return losses(tiny_args("default"))


def test_bfloat16_losses_stay_within_tolerance_of_float32_and_differ(float32_losses):
    """30 SGD steps: |critic loss difference| <= 8e-3 (measured max 2.7e-3), |actor loss difference| <= 5e-2
    (measured 1.6e-2) at every step, and not bit-identical (bfloat16 is really used)."""
    reference, _ = float32_losses
    bf16, state = losses(tiny_args("bfloat16"))
    deviation = np.abs(bf16 - reference)
    assert np.all(np.isfinite(bf16))
    assert deviation[:, 0].max() <= CRITIC_TOLERANCE, deviation[:, 0]
    assert deviation[:, 1].max() <= ACTOR_TOLERANCE, deviation[:, 1]
    assert deviation.max() > 0, "bfloat16 gave float32's losses bit for bit: it is not used"
    # parameters, Adam moments and log(alpha) stay float32
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(state)} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}


def dot_operand_types(hlo: str) -> list[str]:
    """Element types of the operands of every dot_general in a StableHLO text, e.g. ['bf16', 'f32']."""
    return re.findall(r"stablehlo\.dot_general.*?: \(tensor<[0-9x]*x(\w+)>", hlo)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_bfloat16_tower_has_bf16_dots_float32_output_and_float32_params(layer_norm):
    x = jnp.ones((4, 12))
    f32_tower = C.make_tower(tiny_args("default", layer_norm=layer_norm), 8)
    bf16_tower = C.make_tower(tiny_args("bfloat16", layer_norm=layer_norm), 8)
    params = f32_tower.init(jax.random.PRNGKey(0), x)
    bf16_params = bf16_tower.init(jax.random.PRNGKey(0), x)
    # the same parameter tree and init values (float32) with either dtype
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(bf16_params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(bf16_params)):
        assert b.dtype == jnp.float32 and np.array_equal(a, b)
    assert bf16_tower.apply(params, x).dtype == jnp.float32
    f32_dots = dot_operand_types(jax.jit(f32_tower.apply).lower(params, x).as_text())
    bf16_dots = dot_operand_types(jax.jit(bf16_tower.apply).lower(params, x).as_text())
    assert f32_dots and set(f32_dots) == {"f32"}
    assert bf16_dots and set(bf16_dots) == {"bf16"}
    # an encoder's head after the bfloat16 tower stays float32
    encoder = C.build_networks(tiny_args("bfloat16", layer_norm=layer_norm), 0, 0, 2).g_encoder
    encoder_params = encoder.init(jax.random.PRNGKey(0), x)
    encoder_dots = dot_operand_types(jax.jit(encoder.apply).lower(encoder_params, x).as_text())
    assert "bf16" in encoder_dots and "f32" in encoder_dots
    assert encoder.apply(encoder_params, x).dtype == jnp.float32


def test_float32_precision_is_bit_identical_to_default_on_cpu(float32_losses):
    assert jax.default_backend() == "cpu"
    args = tiny_args("float32")
    nets = C.build_networks(args, 0, 0, DIMS.action_size)
    params = nets.g_encoder.init(jax.random.PRNGKey(0), jnp.ones((4, 3)))
    default_hlo = jax.jit(nets.g_encoder.apply).lower(params, jnp.ones((4, 3))).as_text()
    try:
        runkit.apply_matmul_precision(args)
        assert jax.config.jax_default_matmul_precision == "float32"
        # the setting reaches the program (HIGHEST on every dot) ...
        hlo = jax.jit(nets.g_encoder.apply).lower(params, jnp.ones((4, 3))).as_text()
        assert "HIGHEST" in hlo and "HIGHEST" not in default_hlo
        # ... and on CPU computes exactly what the default does
        float32, _ = losses(args, steps=5)
    finally:
        jax.config.update("jax_default_matmul_precision", None)
    np.testing.assert_array_equal(float32, float32_losses[0][:5])


def test_default_and_bfloat16_leave_jax_precision_alone():
    for precision in ("default", "bfloat16"):
        runkit.apply_matmul_precision(tiny_args(precision))
        assert jax.config.jax_default_matmul_precision is None


# --- every script accepts the flag: --dry-run --matmul-precision bfloat16 with test_dry_run's tiny args ---
SCRIPT_CASES = ["crl_deep", "sac_her", "td3_her", "gcbc", "offline_crl", "qrl_online"]
# With the slow tests (their compiles; qrl's IQE epoch: 20-40 s). In CI crl_deep's bfloat16 dry run is
# tests/test_dry_run.py's crl_deep case, and the flag's wiring in every script is checked below, without compiling.
NAMES = [pytest.param(n, marks=pytest.mark.slow) for n in SCRIPT_CASES]


@pytest.mark.parametrize("script", ["crl_deep", "sac_her", "td3_her", "gcbc", "offline_crl", "qrl"])
def test_every_script_has_the_flag_and_applies_it(script):
    """The Args field (same default and choices), a bfloat16 tower from make_tower, and the precision applied in
    __main__ before the dry run's branch (the shared tower block itself is tests/test_copies.py's)."""
    module = importlib.import_module(script)
    field = {f.name: f for f in dataclasses.fields(module.Args)}["matmul_precision"]
    assert field.default == "default" and typing.get_args(typing.get_type_hints(module.Args)["matmul_precision"]) == (
        "default",
        "float32",
        "bfloat16",
    )
    defaults = {f.name: f.default for f in dataclasses.fields(module.Args) if f.default is not dataclasses.MISSING}
    args = types.SimpleNamespace(**{**defaults, "matmul_precision": "bfloat16"})
    assert module.make_tower(args, 8).dtype == jnp.bfloat16
    main = open(os.path.join(ROOT, f"{script}.py")).read().split('if __name__ == "__main__":')[1]
    # applied before anything is traced, the dry run included: in __main__ before its --dry-run branch, or in dry_run
    applied_first = "apply_matmul_precision(" in main.split("dry_run(")[0]
    assert applied_first or "apply_matmul_precision(" in inspect.getsource(module.dry_run)


@pytest.fixture(scope="module")
def bf16_dry_runs(tmp_path_factory, dataset):  # noqa: F811
    """{case: (return code, stdout lines, stderr)}, each case run when a test first asks for it."""

    class Runs(dict):
        def __missing__(self, name):
            script = CASES[name][0]
            cwd = tmp_path_factory.mktemp(f"bf16_{name}")
            command = [sys.executable, os.path.join(ROOT, script), "--dry-run", *argv_of(name, dataset)]
            command += ["--matmul-precision", "bfloat16", "--run-dir", str(cwd / "runs")]
            proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
            self[name] = (proc.returncode, proc.stdout.splitlines(), proc.stderr)
            return self[name]

    return Runs()


@pytest.mark.parametrize("name", NAMES)
def test_every_script_dry_runs_with_bfloat16(bf16_dry_runs, name):
    code, lines, err = bf16_dry_runs[name]
    assert code == 0, err[-2000:]
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["args"]["matmul_precision"] == "bfloat16"
    assert report["params_total"] > 0 and report["peak_bytes"] > 0


def test_resume_with_another_precision_is_refused(tmp_path):
    """No special case: the resume rule (flags given again must match the run's) covers the flag."""
    args = tiny_args("bfloat16", env="reacher")
    run = tmp_path / "run"
    run.mkdir()
    runkit.save_checkpoint(str(run), "crl_deep", args, {"x": np.zeros(1, np.float32)}, 0, 0, 0.0)
    with pytest.raises(SystemExit, match=r"--matmul-precision 'default' \(the run has 'bfloat16'\)"):
        runkit.parse_args(C.Args, "crl_deep", ["--resume", str(run), "--matmul-precision", "default"])
    assert (
        runkit.parse_args(C.Args, "crl_deep", ["--resume", str(run), "--matmul-precision", "bfloat16"]).matmul_precision
        == "bfloat16"
    )
    assert runkit.parse_args(C.Args, "crl_deep", ["--resume", str(run)]).matmul_precision == "bfloat16"


@pytest.mark.slow  # CI time (29 s); crl_deep's bfloat16 epoch compiles in CI (test_dry_run's crl_deep case)
def test_short_bfloat16_run_finishes_with_finite_losses(tmp_path):
    """crl_deep on reacher, 2 epochs with --matmul-precision bfloat16: config, finite losses, metrics."""
    from test_crl_runs import TINY, _run

    two_epochs = list(TINY)
    two_epochs[two_epochs.index("--num-epochs") + 1] = "2"
    two_epochs[two_epochs.index("--total-env-steps") + 1] = str(80 + 2 * 2 * 40)
    proc = _run(*two_epochs, "--matmul-precision", "bfloat16", "--run-dir", str(tmp_path), "--run-name", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["args"]["matmul_precision"] == "bfloat16"
    lines = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    epochs = [line for line in lines if "epoch" in line]
    assert [line["epoch"] for line in epochs] == [0, 1]
    for line in epochs:
        for name in ("training/critic_loss", "training/actor_loss", "training/alpha_loss"):
            assert np.isfinite(line[name]), (name, line)
