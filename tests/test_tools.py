"""Figures and videos of tools/ from small run folders: curves, table, Q map, video."""

import ast
import dataclasses
import json
import os

import numpy as np
import pytest

import runkit
from tools import curves
from tools.render import chosen_backend, osmesa_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Rendering needs OSMesa on CPU (apt-get install libosmesa6) or EGL on a GPU machine.
needs_gl = pytest.mark.skipif(
    chosen_backend() == "osmesa" and not osmesa_available(),
    reason="no OpenGL backend for MuJoCo: apt-get install libosmesa6 (or MUJOCO_GL=egl with a GPU)",
)


# ---------------------------------------------------------------- learning curves and the table


def _fake_run(root, name, env, depth, seed, ys, summary=None):
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"script": "crl_deep", "args": {"env": env, "depth": depth, "seed": seed}})
    )
    lines = [json.dumps({"epoch": e, "env_steps": 1000 * (e + 1), "eval/episode_success": y}) for e, y in enumerate(ys)]
    if summary is not None:
        lines.append(json.dumps({"summary": True, "eval/episode_success_last5": summary}))
        (path / "summary.json").write_text(json.dumps({"summary": True, "eval/episode_success_last5": summary}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fake_runs(tmp_path):
    root = tmp_path / "runs"
    _fake_run(root, "a_d4_s0", "ant_u4_maze", 4, 0, [0, 10, 20, 30, 40, 50])  # unfinished: last5 = 30
    _fake_run(root, "a_d4_s1", "ant_u4_maze", 4, 1, [0, 2, 4, 6, 8, 10], summary=7.0)  # the summary wins
    _fake_run(root, "a_d16_s0", "ant_u4_maze", 16, 0, [100, 200, 300], summary=200.0)
    _fake_run(root, "h_d4_s0", "humanoid", 4, 0, [5, 5, 5], summary=5.0)
    return root


def test_score_table_by_hand(fake_runs):
    runs = curves.find_runs([str(fake_runs)])
    rows = curves.score_table(runs, ["depth"], "eval/episode_success")
    by_key = {(r["env"], r["depth"]): r for r in rows}
    assert list(by_key) == [("ant_u4_maze", 4), ("ant_u4_maze", 16), ("humanoid", 4)]  # numeric sort
    r = by_key[("ant_u4_maze", 4)]
    assert r["score_mean"] == pytest.approx((30 + 7) / 2)
    assert r["score_std"] == pytest.approx(11.5)
    assert (r["seeds"], r["finished"], r["env_steps"]) == (2, 1, 6000)
    assert by_key[("ant_u4_maze", 16)]["score_std"] == 0.0


def test_mean_curve_by_hand(fake_runs):
    runs = [r for r in curves.find_runs([str(fake_runs)]) if r.args["depth"] == 4 and r.args["env"] == "ant_u4_maze"]
    x, mean, std, n = curves.mean_curve(runs, "eval/episode_success")
    np.testing.assert_allclose(x, [1000, 2000, 3000, 4000, 5000, 6000])
    np.testing.assert_allclose(mean, [0, 6, 12, 18, 24, 30])
    np.testing.assert_allclose(std, [0, 4, 8, 12, 16, 20])
    np.testing.assert_allclose(n, 2)


def _image(path):
    import imageio.v2 as imageio

    return np.asarray(imageio.imread(path))


def test_curves_cli_writes_png_markdown_and_csv(fake_runs, tmp_path):
    out = str(tmp_path / "fig" / "curves.png")
    assert curves.main([str(fake_runs), "--group", "depth", "--out", out]) == 0
    img = _image(out)
    assert img.shape[0] > 300 and img.shape[1] > 600 and img[..., :3].std() > 10  # two panels, not blank
    md = open(str(tmp_path / "fig" / "curves_table.md")).read()
    assert "| ant_u4_maze | 4 | 18.50 +- 11.50 | 2 | 1 | 6,000 |" in md
    csv_lines = open(str(tmp_path / "fig" / "curves_table.csv")).read().splitlines()
    assert csv_lines[0] == "env,depth,score_mean,score_std,seeds,finished,env_steps" and len(csv_lines) == 4


def test_curves_cli_fails_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert curves.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no run folders") and "\n" not in err


# ---------------------------------------------------------------- checkpoint-based figures


@pytest.fixture(scope="module")
def maze_run(tmp_path_factory):
    """A crl_deep run folder (config.json + checkpoint.msgpack written by crl_deep's own functions) on
    ant_u_maze with small freshly initialised networks: what a run leaves after its first epoch."""
    import jax

    import crl_deep
    import envs

    args = crl_deep.Args(env="ant_u_maze", depth=4, width=16, repr_dim=8, seed=0)
    env = envs.make(args.env)
    dims = crl_deep.Dims(env.state_dim, tuple(int(i) for i in env.goal_indices), env.action_size)
    nets = crl_deep.build_networks(args, env.observation_size, len(dims.goal_indices), dims.action_size)
    train_state = crl_deep.init_train_state(jax.random.PRNGKey(0), nets, crl_deep.make_optimizers(args), args, dims)
    path = tmp_path_factory.mktemp("runs") / "tiny"
    path.mkdir()
    carry = {"train_state": train_state, "env_state": {}, "key": jax.random.PRNGKey(1)}
    runkit.save_checkpoint(str(path), "crl_deep", args, runkit.checkpoint_state(carry), 0, 1234, 0.0)
    (path / "config.json").write_text(json.dumps({"script": "crl_deep", "args": dataclasses.asdict(args)}))
    return str(path)


def test_agent_critic_is_the_negative_l2_distance(maze_run):
    import jax.numpy as jnp

    from tools.agent import load_agent

    agent = load_agent(maze_run)
    assert (agent.args.width, agent.env_steps) == (16, 1234)
    rng = np.random.default_rng(0)
    s, a, g = rng.normal(size=(5, 29)), rng.uniform(-1, 1, size=(5, 8)), rng.normal(size=(5, 2))
    phi = np.asarray(agent.phi(jnp.asarray(s, jnp.float32), jnp.asarray(a, jnp.float32)))
    psi = np.asarray(agent.psi(jnp.asarray(g, jnp.float32)))
    assert phi.shape == psi.shape == (5, 8)
    f = np.asarray(agent.critic(jnp.asarray(s, jnp.float32), jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32)))
    np.testing.assert_allclose(f, -np.linalg.norm(phi - psi, axis=1), rtol=1e-4, atol=1e-4)


def test_load_agent_rejects_other_scripts(tmp_path):
    from tools.agent import load_agent

    (tmp_path / "checkpoint.msgpack").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"script": "sac_her", "args": {}}))
    with pytest.raises(ValueError, match="crl_deep checkpoints only"):
        load_agent(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="checkpoint.msgpack: not a checkpoint.msgpack"):
        load_agent(str(tmp_path))  # the script's one-line error, as a ValueError


def test_default_goal_is_the_far_end_of_the_corridor():
    from tools.qmap import default_goal, maze_path_distances

    # U eval layout: start (1,1); goals (3,1),(3,2),(3,3); the corridor reaches (3,1) last (6 moves).
    np.testing.assert_allclose(default_goal("ant_u_maze"), [12.0, 4.0])
    dist = maze_path_distances(("11111", "1r001", "11101", "1ggg1", "11111"), (1, 1))
    assert dist[(3, 1)] == 6 and dist[(3, 3)] == 4 and (2, 1) not in dist


def test_qmap_values_walls_and_png(maze_run, tmp_path):
    import envs
    from tools import qmap
    from tools.agent import load_agent

    env = envs.make("ant_u_maze")
    xs, ys, v, maze = qmap.q_grid(load_agent(maze_run), env, np.array([12.0, 4.0]), points_per_cell=2)
    assert v.shape == (len(ys), len(xs)) == (10, 10)  # 5 x 5 cells, 2 points per cell side
    # exactly the points inside wall cells are NaN: 7 free cells of the U layout x 4 points each
    assert np.isfinite(v).sum() == 7 * 4
    assert np.isnan(v[0, 0]) and np.isfinite(v[2, 2])  # corner wall; start cell (1, 1)
    assert np.nanstd(v) > 0  # the value depends on the torso position
    out = str(tmp_path / "qmap.png")
    stats = qmap.plot_qmaps([maze_run], out)
    assert stats[0]["points"] == 7 * 64  # default 8 x 8 points per cell
    img = _image(out)
    assert img.shape[1] > 300 and img[..., :3].std() > 10


@needs_gl
@pytest.mark.filterwarnings("ignore:os.fork")
def test_video_shows_the_goal_marker_and_has_one_frame_per_rendered_step(maze_run, tmp_path):
    import imageio.v2 as imageio

    from tools import video

    out = str(tmp_path / "rollout.mp4")
    info = video.make_video(maze_run, out, steps=10, every=2, num_envs=2, width=160, height=120)  # same rollout
    # shape as the representation test, so the second compile is a cache hit
    assert info["frames"] == 6 and info["env"] == "ant_u_maze_eval"
    frames = [np.asarray(f) for f in imageio.get_reader(out)]
    assert len(frames) == 6 and frames[0].shape == (120, 160, 3)
    f = frames[0].astype(int)
    green = (f[..., 1] > f[..., 0] + 40) & (f[..., 1] > f[..., 2] + 40)
    assert green.sum() > 5, "goal marker not visible"
    assert f.std() > 20


def test_write_video_gif_and_bad_extension(tmp_path):
    import imageio.v2 as imageio

    from tools.render import write_video

    frames = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(4)]
    write_video(frames, str(tmp_path / "a.gif"), fps=5)
    back = imageio.mimread(str(tmp_path / "a.gif"))
    assert len(back) == 4 and int(np.asarray(back[3])[..., :3].mean()) == 120
    with pytest.raises(ValueError, match=".mp4 or .gif"):
        write_video(frames, str(tmp_path / "a.avi"), fps=5)


def test_pca_and_spread_by_hand():
    from tools.representation import mean_pairwise_distance, pca_2d

    x = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [4.0, 0.0, 0.0]])  # a line: one axis holds it all
    proj, extra, ratio = pca_2d(x, np.array([[2.0, 1.0, 0.0]]))
    np.testing.assert_allclose(np.abs(proj[:, 0]), [2.0, 0.0, 2.0], atol=1e-9)
    np.testing.assert_allclose(proj[:, 1], 0.0, atol=1e-9)
    assert ratio == pytest.approx(1.0) and abs(extra[0, 0]) == pytest.approx(0.0, abs=1e-9)
    assert mean_pairwise_distance(x) == pytest.approx((2 + 4 + 2) / 3)
    assert np.isnan(mean_pairwise_distance(x[:1]))


def test_residual_norm_is_the_mean_l2_norm_of_the_branch(maze_run):
    """Recompute block 1's branch of phi by hand: tower output minus the input layer's output."""
    import jax
    import jax.numpy as jnp

    from tools.agent import load_agent
    from tools.residual_norms import residual_norms

    agent = load_agent(maze_run)
    rng = np.random.default_rng(1)
    obs = jnp.asarray(rng.normal(size=(6, 31)), jnp.float32)
    actions = jnp.asarray(rng.uniform(-1, 1, size=(6, 8)), jnp.float32)
    norms = residual_norms(agent, obs, actions, state_dim=29)
    assert {k: v.shape for k, v in norms.items()} == {"actor": (1,), "sa_encoder": (1,), "g_encoder": (1,)}
    p = agent.params["sa_encoder"]["params"]["tower"]
    x = jnp.concatenate([obs[:, :29], actions], -1)
    h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
    h = jax.nn.swish(h * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"])
    out = agent.nets.sa_encoder.tower.apply({"params": p}, x)
    expected = np.linalg.norm(np.asarray(out - h), axis=-1).mean()
    assert norms["sa_encoder"][0] == pytest.approx(expected, rel=1e-3)


def test_representation_and_residual_norm_figures(maze_run, tmp_path):
    from tools import representation, residual_norms

    stats = representation.plot_representations([maze_run], str(tmp_path / "r.png"), steps=10, num_envs=2)
    assert stats[0]["steps"] == 10 and stats[0]["env"] == "ant_u_maze_eval"
    results = residual_norms.plot_residual_norms([maze_run], str(tmp_path / "n.png"), steps=10, num_envs=2)
    assert results[0]["batch"] == 20 and all(v[0] > 0 for k, v in results[0].items() if k in ("actor", "g_encoder"))
    for name in ("r.png", "n.png"):
        img = _image(str(tmp_path / name))
        assert img.shape[1] > 300 and img[..., :3].std() > 10


# ---------------------------------------------------------------- --num-seeds runs: --run-seed


@pytest.fixture(scope="module")
def two_seed_run(tmp_path_factory):
    """A `crl_deep.py --num-seeds 2 --seed 3` run folder (seeds 3 and 4) as its main loop checkpoints it:
    every array stacked on a leading seed axis, from the script's own seed_keys, vmapped init_train_state
    and save_checkpoint. Small fresh networks on ant_u_maze (a maze, for the Q map), in-process: a trained
    run (tests/test_crl_runs.py) costs 15-40 s more and the tools read its checkpoint the same way."""
    import jax

    import crl_deep
    import envs

    args = crl_deep.Args(env="ant_u_maze", depth=4, width=16, repr_dim=8, seed=3, num_seeds=2)
    env = envs.make(args.env)
    dims = crl_deep.Dims(env.state_dim, tuple(int(i) for i in env.goal_indices), env.action_size)
    nets = crl_deep.build_networks(args, env.observation_size, len(dims.goal_indices), dims.action_size)
    key, k_init, _, _ = runkit.seed_keys(
        args.seed, args.num_seeds
    )  # [2, 2] each: the keys of runs of --seed 3 and --seed 4
    optimizers = crl_deep.make_optimizers(args)
    train_state = jax.vmap(lambda k: crl_deep.init_train_state(k, nets, optimizers, args, dims))(k_init)
    path = tmp_path_factory.mktemp("runs") / "two_seeds"
    path.mkdir()
    carry = {"train_state": train_state, "env_state": {}, "key": key}
    runkit.save_checkpoint(str(path), "crl_deep", args, runkit.checkpoint_state(carry), 0, 5678, 0.0)
    (path / "config.json").write_text(json.dumps({"script": "crl_deep", "args": dataclasses.asdict(args)}))
    return str(path)


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_load_agent_run_seed_is_that_seeds_slice_of_the_stack(two_seed_run):
    import jax

    import crl_deep
    import envs
    from tools import evaluate
    from tools.agent import load_agent

    env = envs.make("ant_u_maze")
    stacked = runkit.load_checkpoint(two_seed_run, "crl_deep")["params"]
    assert _leaves(stacked)[0].shape[0] == 2
    agents = {s: load_agent(two_seed_run, run_seed=s) for s in (3, 4)}
    for i, (seed, agent) in enumerate(agents.items()):
        assert (agent.args.seed, agent.args.num_seeds, agent.run_seed, agent.env_steps) == (seed, 1, seed, 5678)
        assert agent.run_info == {"run": two_seed_run, "run_seed": seed} and f"seed {seed}" in agent.label
        assert jax.tree_util.tree_structure(agent.params) == jax.tree_util.tree_structure(stacked)
        for got, full in zip(_leaves(agent.params), _leaves(stacked)):
            np.testing.assert_array_equal(got, full[i])
        # the slice is what a run of --seed S alone starts from
        alone = crl_deep.Args(env="ant_u_maze", depth=4, width=16, repr_dim=8, seed=seed)
        dims = crl_deep.Dims(env.state_dim, tuple(int(i) for i in env.goal_indices), env.action_size)
        k_init = runkit.seed_keys(alone.seed, alone.num_seeds)[1]
        single = crl_deep.init_train_state(k_init, agent.nets, crl_deep.make_optimizers(alone), alone, dims)["params"]
        for got, want in zip(_leaves(agent.params), _leaves(single)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        # tools/evaluate.py slices with the same helper: its actor is the agent's
        for got, want in zip(_leaves(evaluate.load_policy(two_seed_run, seed).params), _leaves(agent.params["actor"])):
            np.testing.assert_array_equal(got, want)
    differ = [not np.array_equal(a, b) for a, b in zip(_leaves(agents[3].params), _leaves(agents[4].params))]
    assert any(differ)
    rng = np.random.default_rng(0)
    s, a, g = (np.asarray(rng.normal(size=(3, n)), np.float32) for n in (29, 8, 2))
    assert not np.allclose(np.asarray(agents[3].critic(s, a, g)), np.asarray(agents[4].critic(s, a, g)))


def test_load_agent_run_seed_errors(two_seed_run, maze_run):
    from tools.agent import load_agent, load_agents, seed_out_path

    with pytest.raises(ValueError, match=r"a run of 2 seeds \(3\.\.4\); pick one with --run-seed$"):
        load_agent(two_seed_run)
    with pytest.raises(ValueError, match=r"--run-seed 5 is not one of the run's seeds \[3, 4\]$"):
        load_agent(two_seed_run, run_seed=5)
    assert load_agent(maze_run, run_seed=0).args.seed == 0  # a single-seed run: its own seed is accepted
    with pytest.raises(ValueError, match=r"--run-seed 1 is not one of the run's seeds \[0\]$"):
        load_agent(maze_run, run_seed=1)
    with pytest.raises(ValueError, match="3 seeds for 2 runs"):
        load_agents([two_seed_run, two_seed_run], [3, 4, 5])
    assert [a.run_seed for a in load_agents([maze_run, two_seed_run], [0, 4])] == [0, 4]
    assert seed_out_path("figures/qmap.png", None) == "figures/qmap.png"
    assert seed_out_path("figures/rollout.mp4", 4) == "figures/rollout_s4.mp4"
    assert seed_out_path("figures/qmap.png", [3, 4]) == "figures/qmap_s3_4.png"
    assert seed_out_path("figures/qmap.png", [3, 3]) == "figures/qmap_s3.png"


def test_qmap_cli_on_two_seeds_of_one_run(two_seed_run, tmp_path, monkeypatch, capsys):
    from tools import qmap

    monkeypatch.chdir(tmp_path)  # the default --out lands under figures/ here
    assert qmap.main([two_seed_run]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "pick one with --run-seed" in err and "\n" not in err
    assert qmap.main([two_seed_run, two_seed_run, "--run-seed", "3", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "-> figures/qmap_s3_4.png" and _image(str(tmp_path / "figures" / "qmap_s3_4.png")).shape[1] > 300
    stats = [ast.literal_eval(line) for line in out[:-1]]  # one dict per panel, printed as Python dicts
    assert [(s["run"], s["run_seed"]) for s in stats] == [(two_seed_run, 3), (two_seed_run, 4)]
    assert stats[0]["points"] == stats[1]["points"] == 7 * 64
    assert (stats[0]["min"], stats[0]["max"]) != (stats[1]["min"], stats[1]["max"])  # two different critics


def test_collector_learner_plot_from_run_folders(tmp_path):
    from tools import collector_learner

    for seed in (0, 1):
        path = tmp_path / f"cl_s{seed}"
        path.mkdir()
        (path / "config.json").write_text(
            json.dumps(
                {
                    "script": "collector_learner",
                    "args": {"env": "ant_big_maze", "collector_depth": 32, "learner_depths": [4, 32], "seed": seed},
                }
            )
        )
        rows = [
            {
                "epoch": e,
                "env_steps": 100 * (e + 1),
                "eval/collector_d32/episode_success": 10.0 * e,
                "eval/learner_d4/episode_success": 1.0 * e,
                "eval/learner_d32/episode_success": 8.0 * e,
            }
            for e in range(4)
        ]
        (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert collector_learner.agent_names(32, [4, 32]) == ["collector_d32", "learner_d4", "learner_d32"]
    out = str(tmp_path / "cl.png")
    assert collector_learner.main(["--plot", str(tmp_path), "--out", out]) == 0
    assert _image(out)[..., :3].std() > 10
    assert collector_learner.main(["--plot", str(tmp_path / "cl_s0" / "nothing"), "--out", out]) == 2


def test_curves_leave_out_interrupted_attempts_and_runs_of_other_kinds(fake_runs, tmp_path, capsys):
    _fake_run(fake_runs, "a_d4_s0.interrupted-1700000000", "ant_u4_maze", 4, 0, [999])
    other = fake_runs / "cl"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"script": "collector_learner", "args": {"env": "ant"}}))
    (other / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "env_steps": 1, "eval/episode_success": 1}) + "\n")
    assert len(curves.find_runs([str(fake_runs)])) == 5  # 4 runs + cl; the interrupted folder is skipped
    assert curves.main([str(fake_runs), "--out", str(tmp_path / "c.png")]) == 0
    assert "1 run(s) without ['depth', 'env']" in capsys.readouterr().err
    md = (tmp_path / "c_table.md").read_text()
    assert "| ant_u4_maze | 4 | 18.50 +- 11.50 | 2 | 1 | 6,000 |" in md


def test_bench_results_turns_json_lines_into_a_dated_section(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_results", os.path.join(ROOT, "bench", "results.py"))
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    lines = ['{"depth": 4, "steps_per_s": 2.5}', "not json", '{"depth": 64, "steps_per_s": 0.5}', '{"summary": 1}']
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    assert results.main([str(tmp_path / "b.jsonl"), "--title", "Tower", "--command", "python bench/x.py"]) == 0
    out = capsys.readouterr().out
    assert "## Tower" in out and "`python bench/x.py`" in out and "jax " in out
    assert "| depth | steps_per_s |\n|---|---|\n| 4 | 2.5 |\n| 64 | 0.5 |" in out and '`{"summary": 1}`' in out
