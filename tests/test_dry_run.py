"""--dry-run in every training script: exit 0, one JSON line, nothing written; its parameter counts,
FLOPs per SGD step and buffer bytes checked against the real initialisation and hand formulas.

The dry runs are subprocesses (the real command line) started together in one fixture, each in its own
empty working folder with --run-dir inside it, so "nothing written" is checked where a run would write.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import crl_deep
import gcbc
import offline_crl
import qrl
import runkit
import sac_her
import td3_her
from envs import ogbench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# reacher: state 10, action 2, goal = state[4:7]; 120 env steps = 2 prefill unrolls + 1 training unroll
ONLINE = [
    "--env",
    "reacher",
    "--num-envs",
    "4",
    "--batch-size",
    "8",
    "--episode-length",
    "50",
    "--unroll-length",
    "10",
    "--sgd-steps-per-train-step",
    "1",
    "--replay-size",
    "100",
    "--min-replay-size",
    "20",
    "--num-epochs",
    "1",
    "--total-env-steps",
    "120",
]
OFFLINE = ["--env", "reacher", "--batch-size", "8", "--train-steps", "2", "--eval-every", "1"]
DATASET = "{dataset}"  # replaced by the fixture's dataset path
CASES = {
    # crl_deep's case also compiles its bfloat16 epoch, once in CI (tests/test_matmul_precision.py's dry runs of
    # every script at bfloat16 run with the slow tests); precision changes no count or FLOP checked here
    "crl_deep": (
        "crl_deep.py",
        [*ONLINE, "--depth", "8", "--width", "8", "--repr-dim", "4", "--matmul-precision", "bfloat16"],
    ),
    "sac_her": ("sac_her.py", [*ONLINE, "--depth", "4", "--width", "8"]),
    "td3_her": ("td3_her.py", [*ONLINE, "--depth", "4", "--width", "8"]),
    "gcbc": ("gcbc.py", [*ONLINE, "--depth", "4", "--width", "8"]),
    "qrl_online": ("qrl.py", [*ONLINE, "--depth", "4", "--width", "8", "--latent-dim", "8"]),
    "offline_crl": (
        "offline_crl.py",
        [*OFFLINE, "--dataset", DATASET, "--depth", "4", "--width", "8", "--repr-dim", "4"],
    ),
    "qrl_offline": (
        "qrl.py",
        ["--mode", "offline", *OFFLINE, "--dataset", DATASET, "--depth", "4", "--width", "8", "--latent-dim", "8"],
    ),
}
# qrl's epochs (IQE) take 20-40 s each to compile on CPU: those cases run with the slow tests
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n.startswith("qrl") else n for n in sorted(CASES)]
KEYS = {"script", "params", "params_total", "flops_per_sgd_step", "buffer_bytes", "memory", "peak_bytes"}
KEYS |= {"compile_seconds", "backend", "device_kind", "args", "sgd_steps_per_epoch"}
STATE, ACTION, GOAL = 10, 2, 3  # reacher
DATASET_ROWS = 200


def argv_of(name, dataset):
    return [dataset if a == DATASET else a for a in CASES[name][1]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A reacher-sized OGBench-format dataset: 4 trajectories of 50 rows."""
    rng = np.random.default_rng(0)
    terminals = np.zeros(DATASET_ROWS, np.float32)
    terminals[49::50] = 1
    path = tmp_path_factory.mktemp("data") / "reacher.npz"
    np.savez(
        path,
        observations=rng.normal(size=(DATASET_ROWS, STATE)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(DATASET_ROWS, ACTION)).astype(np.float32),
        terminals=terminals,
    )
    return str(path)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory, dataset):
    """{case: (return code, stdout lines, stderr, files left in its working folder)}, each case run once,
    when a test first asks for it."""

    class Runs(dict):
        def __missing__(self, name):
            script = CASES[name][0]
            cwd = tmp_path_factory.mktemp(f"cwd_{name}")
            command = [sys.executable, os.path.join(ROOT, script), "--dry-run", *argv_of(name, dataset)]
            command += ["--run-dir", str(cwd / "runs")]
            proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
            self[name] = (proc.returncode, proc.stdout.splitlines(), proc.stderr, sorted(os.listdir(cwd)))
            return self[name]

    return Runs()


def report(dry_runs, name):
    code, lines, err, _ = dry_runs[name]
    assert code == 0, err[-2000:]
    return json.loads(lines[-1])


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_exits_0_prints_one_json_line_and_writes_nothing(dry_runs, name):
    code, lines, err, left = dry_runs[name]
    assert code == 0, err[-2000:]
    assert len(lines) == 1, lines
    out = json.loads(lines[0])
    assert KEYS <= set(out), KEYS - set(out)
    assert out["script"] == CASES[name][0][:-3] and out["args"]["dry_run"] is True
    assert left == []  # no runs/, no wandb/, nothing
    memory = out["memory"]
    assert all(memory[f"{k}_bytes"] > 0 for k in ("argument", "output", "temp", "generated_code", "alias"))
    # the donated train state is updated in place: aliased bytes count once
    assert (
        out["peak_bytes"]
        == memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"] + memory["temp_bytes"]
    )
    assert memory["argument_bytes"] >= out["buffer_bytes"]  # the buffer (or dataset) is an argument
    assert out["flops_per_sgd_step"] > 0 and out["compile_seconds"] > 0
    assert out["params_total"] == sum(out["params"].values())
    assert out["xla_flags"] == os.environ.get("XLA_FLAGS", "")  # the XLA settings it planned under, recorded
    argv = CASES[name][1]
    precision = argv[argv.index("--matmul-precision") + 1] if "--matmul-precision" in argv else "default"
    assert out["args"]["matmul_precision"] == precision


def tower_kernels(n_in, width, depth):
    """Kernel weights of a tower: the input Dense, then `depth` Dense layers of width x width."""
    return n_in * width + depth * width * width


def tower_params(n_in, width, depth):
    """Every parameter of a tower with LayerNorm: kernels, biases, LayerNorm scale and bias."""
    return tower_kernels(n_in, width, depth) + (depth + 1) * 3 * width


def test_crl_deep_counts_and_flops_by_hand(dry_runs):
    out = report(dry_runs, "crl_deep")
    width, depth, repr_dim, batch = 8, 8, 4, 8
    heads = {
        "actor": (STATE + GOAL, 2 * ACTION),  # mean and log_std
        "sa_encoder": (STATE + ACTION, repr_dim),
        "g_encoder": (GOAL, repr_dim),
    }
    params = {k: tower_params(n, width, depth) + width * h + h for k, (n, h) in heads.items()}
    assert out["params"] == params
    assert params["actor"] == 868  # 13*8 + 8 + 16 + 8 * (64 + 8 + 16) + 2 * (8 * 2 + 2)
    kernels = {k: tower_kernels(n, width, depth) + width * h for k, (n, h) in heads.items()}
    # actor and psi trained (3x forward), phi trained and differentiated again w.r.t. the actor's action (3x + 2x)
    flops = batch * 2 * (3 * kernels["actor"] + 5 * kernels["sa_encoder"] + 3 * kernels["g_encoder"])
    assert out["flops_per_sgd_step"] == flops
    capacity, num_envs = 100, 4  # state float32, action float32, traj_id int32; insert_pos, size int32
    assert out["buffer_bytes"] == capacity * num_envs * (STATE + ACTION + 1) * 4 + 2 * 4


def test_sac_her_flops_by_hand(dry_runs):
    out = report(dry_runs, "sac_her")
    width, depth, batch = 8, 4, 8
    actor = tower_kernels(STATE + GOAL, width, depth) + width * 2 * ACTION
    critic = 2 * (tower_kernels(STATE + GOAL + ACTION, width, depth) + width)  # twin Q, Dense(1) heads
    # actor: forward on s' + trained on s; critics: target forward + trained + gradient to the actor's action
    assert out["flops_per_sgd_step"] == batch * 2 * (4 * actor + 6 * critic)
    assert out["params"]["critic"] == 2 * (tower_params(STATE + GOAL + ACTION, width, depth) + width + 1)


def test_td3_her_flops_by_hand(dry_runs):
    out = report(dry_runs, "td3_her")
    width, depth, batch, policy_delay = 8, 4, 8, 2
    actor = tower_kernels(STATE + GOAL, width, depth) + width * ACTION  # deterministic: one head
    critic = 2 * (tower_kernels(STATE + GOAL + ACTION, width, depth) + width)
    # every step: target actor (1x), target critics (1x), critics trained (3x); every 2nd: actor trained,
    # critics under it (2x)
    flops = batch * 2 * (actor + 4 * critic + (3 * actor + 2 * critic) / policy_delay)
    assert out["flops_per_sgd_step"] == round(flops)


def test_gcbc_flops_by_hand(dry_runs):
    out = report(dry_runs, "gcbc")
    width, depth, batch = 8, 4, 8
    policy = tower_kernels(STATE + GOAL, width, depth) + width * 2 * ACTION  # mean and log_std heads
    assert out["flops_per_sgd_step"] == batch * 2 * 3 * policy  # one trained pass (behaviour cloning)


@pytest.mark.slow
def test_qrl_flops_by_hand(dry_runs):
    out = report(dry_runs, "qrl_online")
    width, depth, latent, batch = 8, 4, 8, 8
    actor = tower_kernels(STATE + GOAL, width, depth) + width * 2 * ACTION
    phi = tower_kernels(STATE, width, depth) + width * latent
    psi = tower_kernels(GOAL, width, depth) + width * latent  # reacher's goal is not the whole state
    dynamics = tower_kernels(latent + ACTION, width, depth) + width * latent
    assert out["flops_per_sgd_step"] == batch * 2 * (3 * actor + 5 * dynamics + 7 * (phi + psi))


def count(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def nbytes(tree):
    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))


def real_init(name, dataset):
    """(params by network, the buffer or dataset) as a real run of the case builds them."""
    key = jax.random.PRNGKey(0)
    if name == "crl_deep":
        args = runkit.parse_args(crl_deep.Args, "crl_deep", argv_of(name, dataset))
        dims = crl_deep.Dims(STATE, (4, 5, 6), ACTION)
        nets = crl_deep.build_networks(args, STATE + GOAL, GOAL, ACTION)
        state = crl_deep.init_train_state(key, nets, crl_deep.make_optimizers(args), args, dims)
        return state["params"], crl_deep.buffer_init(args.replay_size, args.num_envs, STATE, ACTION)
    if name in ("sac_her", "td3_her"):
        module = {"sac_her": sac_her, "td3_her": td3_her}[name]
        args = runkit.parse_args(module.Args, name, argv_of(name, dataset))
        nets = module.build_networks(args, ACTION)
        state = module.init_train_state(key, nets, optax.adam(args.learning_rate), STATE + GOAL, ACTION)
        return state["params"], module.buffer_init(args.replay_size, args.num_envs, STATE + GOAL, ACTION, GOAL)
    if name == "gcbc":
        args = gcbc.resolve(runkit.parse_args(gcbc.Args, "gcbc", argv_of(name, dataset)), ("reacher",))
        params = {"actor": gcbc.build_networks(args, ACTION, STATE).init(key, jnp.zeros((1, STATE + GOAL)))}
        return params, gcbc.buffer_init(args.replay_size, args.num_envs, STATE, ACTION)
    if name == "offline_crl":
        args = runkit.parse_args(offline_crl.Args, "offline_crl", argv_of(name, dataset))
        sa, g, actor = offline_crl.make_networks(args, ACTION)
        adam = optax.adam(1e-3)
        state = offline_crl.init_train_state(key, sa, g, actor, STATE, ACTION, GOAL, adam, adam)
        data = offline_crl.make_device_dataset(ogbench.load_dataset(dataset), np.arange(4, 7))
        return {"actor": state["actor"], **state["critic"]}, data
    args = qrl.resolve(runkit.parse_args(qrl.Args, "qrl", argv_of(name, dataset)))
    dims = qrl.Dims(STATE, (4, 5, 6), ACTION)
    state = qrl.init_train_state(key, qrl.build_networks(args, dims), args, dims)
    networks = {k: v for k, v in state["critic"].items() if k.endswith(("encoder", "dynamics"))}
    if name == "qrl_online":
        return {"actor": state["actor"], **networks}, qrl.buffer_init(args.replay_size, args.num_envs, STATE, ACTION)
    data = qrl.make_device_dataset(ogbench.load_dataset(dataset), np.arange(4, 7))
    return {"actor": state["actor"], **networks}, data


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_and_buffer_bytes_are_the_real_runs(dry_runs, dataset, name):
    out = report(dry_runs, name)
    params, buffer = real_init(name, dataset)
    assert out["params"] == {k: count(v) for k, v in params.items()}
    assert out["buffer_bytes"] == nbytes(buffer)


def test_dense_flops_and_tree_bytes_by_hand():
    params = {
        "Dense_0": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
        "blocks": {"Dense_0": {"kernel": jnp.zeros((2, 4, 4)), "bias": jnp.zeros((2, 4))}},
        "LayerNorm_0": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
    }
    assert runkit.dense_flops(params) == 2 * (3 * 4 + 2 * 4 * 4)  # stacked kernels count every copy
    assert runkit.tree_size(params) == 12 + 4 + 32 + 8 + 8
    shapes = {"a": jax.ShapeDtypeStruct((5, 3), jnp.float32), "b": jax.ShapeDtypeStruct((7,), jnp.int8)}
    assert runkit.tree_bytes(shapes) == 5 * 3 * 4 + 7


def test_dry_run_table_rows():
    from tools import dry_run_table

    ok = {
        "args": {"depth": 64, "batch_size": 512, "remat": True},
        "params_total": 12_920_000,
        "flops_per_sgd_step": 47_990_000_000,
        "buffer_bytes": 2**30,
        "memory": {"argument_bytes": 3 * 2**29, "temp_bytes": 2**28},
        "peak_bytes": 7 * 2**28,
        "compile_seconds": 12.4,
    }
    failed = {"error": "XlaRuntimeError: out of memory", "args": {"depth": 1024, "batch_size": 256, "remat": False}}
    rows = dry_run_table.table([ok, failed]).splitlines()
    assert rows[2] == "| 64 | 512 | on | 12.92 | 47.99 | 1.00 | 1.50 | 0.25 | 1.75 | 12 |"
    assert rows[3].startswith("| 1024 | 256 | off | failed: XlaRuntimeError: out of memory")
