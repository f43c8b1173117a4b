"""tools/table1.py on hand-written run folders: scores, ratios, the paper's numbers, the flags."""

import json
import math
import os
import subprocess
import sys

import pytest

import runkit
from tools import table1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = 98_946_048  # what crl_deep reaches with the paper's settings


def write_run(
    path, env, depth, seed, successes, steps, finished=True, script="crl_deep", batch_size=256, seed_field=False
):
    """A run folder as crl_deep writes it: config.json, metrics.jsonl (+ summary line), summary.json.
    `successes` is one list per epoch ({seed: value} when seed_field: several seeds in one folder)."""
    path.mkdir(parents=True)
    args = {"env": env, "depth": depth, "seed": seed, "batch_size": batch_size}
    (path / "config.json").write_text(json.dumps({"script": script, "args": args}))
    lines = []
    for epoch, (value, step) in enumerate(zip(successes, steps)):
        if seed_field:
            lines += [
                {"epoch": epoch, "seed": s, "env_steps": step, "eval/episode_success": v} for s, v in value.items()
            ]
        else:
            lines.append({"epoch": epoch, "env_steps": step, "eval/episode_success": value})
    if finished and not seed_field:
        tail = successes[-5:]
        summary = {"summary": True, "eval/episode_success_last5": sum(tail) / len(tail)}
    elif finished:  # as crl_deep --num-seeds writes it: each seed's last-5 under "seeds", their mean and std
        per_seed = {str(s): {"eval/episode_success_last5": sum(v[s] for v in successes[-5:]) / 5} for s in successes[0]}
        scores = [p["eval/episode_success_last5"] for p in per_seed.values()]
        mean = sum(scores) / len(scores)
        summary = {"summary": True, "epochs": len(successes), "env_steps": steps[-1], "num_seeds": len(scores)}
        summary["eval/episode_success_last5"] = mean
        summary["eval/episode_success_last5_std"] = math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores))
        summary["seeds"] = per_seed
    if finished:
        lines.append(summary)
        (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture
def grid(tmp_path):
    steps6 = [FULL // 6 * (i + 1) for i in range(5)] + [FULL]
    # ant_u4_maze depth 4: three finished seeds, last-5 means 10, 20, 30 (first epoch is left out)
    for seed, base in enumerate([10, 20, 30]):
        write_run(
            tmp_path / f"u4_d4_s{seed}",
            "ant_u4_maze",
            4,
            seed,
            [999] + [base - 2, base - 1, base, base + 1, base + 2],
            steps6,
        )
    # depth 64: two finished seeds (last-5 200 and 300) and one folder holding no summary (interrupted at
    # epoch 3 of 6: its score is the mean of its 4 evaluations, its steps the shortest)
    write_run(tmp_path / "u4_d64_s0", "ant_u4_maze", 64, 0, [0, 200, 200, 200, 200, 200], steps6)
    write_run(tmp_path / "u4_d64_s1", "ant_u4_maze", 64, 1, [0, 300, 300, 300, 300, 300], steps6)
    write_run(tmp_path / "u4_d64_s2", "ant_u4_maze", 64, 2, [40, 80, 120, 160], steps6[:4], finished=False)
    # humanoid: two seeds trained in one process (a `seed` field per line), 2M steps, batch 512
    write_run(
        tmp_path / "hum_d4",
        "humanoid",
        4,
        7,
        [{7: 1.0, 8: 3.0}, {7: 2.0, 8: 4.0}],
        [1_000_000, 2_000_000],
        seed_field=True,
        batch_size=512,
        finished=False,
    )
    # humanoid_u_maze depth 4: three seeds trained in one process, finished, at the paper's length; the
    # first of 6 evaluations is outside each seed's last 5 (seed 5: 10, seed 6: 20, seed 7: 60)
    write_run(
        tmp_path / "humu_d4",
        "humanoid_u_maze",
        4,
        5,
        [{5: 999.0, 6: 999.0, 7: 999.0}] + [{5: 10.0, 6: 20.0, 7: 60.0}] * 5,
        steps6,
        seed_field=True,
    )
    # a run of another script is left out
    write_run(tmp_path / "sac", "humanoid", 4, 0, [5.0], [FULL], script="sac_her")
    return tmp_path


def test_rows_by_hand(grid):
    runs = table1.run_files.find_runs([str(grid)])
    rows = {(r["env"], r["depth"]): r for r in table1.table_rows([r for r in runs if r.script == "crl_deep"])}
    # paper order, then depth
    assert list(rows) == [("ant_u4_maze", 4), ("ant_u4_maze", 64), ("humanoid", 4), ("humanoid_u_maze", 4)]
    d4, d64, hum = rows[("ant_u4_maze", 4)], rows[("ant_u4_maze", 64)], rows[("humanoid", 4)]
    humu = rows[("humanoid_u_maze", 4)]
    assert humu["mean"] == pytest.approx(30.0) and humu["std"] == pytest.approx(math.sqrt(1400 / 3))
    assert humu["seeds"] == 3 and humu["env_steps"] == FULL and humu["notes"] == [] and humu["paper"] == 3.2
    assert d4["mean"] == pytest.approx(20.0) and d4["std"] == pytest.approx(math.sqrt(200 / 3))
    assert d4["seeds"] == 3 and d4["paper"] == 11.4 and d4["env_steps"] == FULL and d4["notes"] == []
    assert d4["ratio"] is None and d4["paper_ratio"] is None  # ratios live on the depth-64 row
    scores = [200.0, 300.0, 100.0]  # the interrupted seed: mean of 40, 80, 120, 160
    mean = sum(scores) / 3
    assert d64["mean"] == pytest.approx(mean)
    assert d64["std"] == pytest.approx(math.sqrt(sum((s - mean) ** 2 for s in scores) / 3))
    assert d64["ratio"] == pytest.approx(mean / 20.0) and d64["paper_ratio"] == pytest.approx(286 / 11.4)
    assert d64["env_steps"] == steps6_at(3) and d64["paper"] == 286
    assert d64["notes"] == [f"SHORT: {steps6_at(3) / 1e8:.1%} of the paper's 100M steps", "1 unfinished"]
    assert hum["mean"] == pytest.approx((1.5 + 3.5) / 2) and hum["std"] == pytest.approx(1.0)
    assert hum["seeds"] == 2 and hum["batch_size"] == 512 and hum["env_steps"] == 2_000_000
    assert hum["notes"] == ["SHORT: 2.0% of the paper's 100M steps", "2 unfinished", "2 seeds"]


def steps6_at(i):
    return FULL // 6 * (i + 1)


def test_cli_prints_the_markdown_table(grid, tmp_path):
    out = tmp_path / "t.md"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.table1", str(grid), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 run folder(s) not made by crl_deep.py left out" in proc.stderr
    assert out.read_text() == proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[2].startswith("| env | depth | ours | seeds | paper | ratio (ours) | ratio (paper) |")
    assert lines[4] == "| ant_u4_maze | 4 | 20.0 +- 8.2 | 3 | 11.4 | - | - | 98,946,048 | 256 |  |"
    assert lines[5].startswith(
        "| ant_u4_maze | 64 | 200 +- 81.6 | 3 | 286 | 10x | 25x | 65,964,032 | 256 | SHORT: 66.0%"
    )
    assert lines[6].startswith("| humanoid | 4 | 2.5 +- 1.0 | 2 | 12.6 | - | - | 2,000,000 | 512 | SHORT: 2.0%")


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tools.table1", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: no crl_deep run folders")


def test_documented_commands_are_the_sweeps_runs_at_the_papers_settings():
    """docs/table1.md's command per env parses with crl_deep's Args and equals the sweep's grid point."""
    import dataclasses
    import re
    import shlex

    import tyro

    import crl_deep
    from tools import grid

    text = open(os.path.join(ROOT, "docs", "table1.md")).read()
    paper = re.search(r'^PAPER="(.*)"$', text, flags=re.M).group(1)
    lines = [line for line in text.splitlines() if line.startswith("python crl_deep.py $PAPER ")]
    sweep = grid.load_sweep(os.path.join(ROOT, "sweeps", "table1.yaml"))
    points = {r.params["env"]: r for r in grid.expand(sweep, only={"depth": ["64"], "seed": ["0"]})}
    assert len(lines) == 10 and len(points) == 10
    for line in lines:
        argv = shlex.split(line.replace("$PAPER", paper))[2:]
        documented = tyro.cli(crl_deep.Args, args=argv)
        crl_deep.check_args(documented, num_devices=1)
        swept = tyro.cli(crl_deep.Args, args=points.pop(documented.env).argv())
        assert dataclasses.replace(documented, eval_env=None) == swept  # the sweep leaves the eval env to the default
        assert documented.eval_env == __import__("envs").eval_variant(documented.env)
        assert (
            documented.num_envs,
            documented.unroll_length,
            documented.sgd_steps_per_train_step,
            documented.replay_size,
            documented.min_replay_size,
            documented.num_epochs,
            documented.total_env_steps,
            documented.num_eval_envs,
        ) == (512, 62, 800, 10_000, 1_000, 100, 10**8, 128)
        steps = (
            runkit.prefill_unrolls(documented) * 62 * 512 + 100 * runkit.train_steps_per_epoch(documented) * 512 * 62
        )
        assert steps == FULL >= table1.FULL_LENGTH * table1.PAPER_ENV_STEPS  # a full run is not flagged SHORT
    assert not points


def test_a_folder_of_several_seeds_is_one_run_per_seed(grid):
    """find_runs splits a --num-seeds folder: each seed its own lines, args["seed"] and summary."""
    runs = [r for r in table1.run_files.find_runs([str(grid)]) if r.path.endswith("humu_d4")]
    assert [r.args["seed"] for r in runs] == [5, 6, 7]
    assert all(len(r.epochs) == 6 and {e["seed"] for e in r.epochs} == {r.args["seed"]} for r in runs)
    assert [r.summary["eval/episode_success_last5"] for r in runs] == [10.0, 20.0, 60.0]
    assert [r.score("eval/episode_success") for r in runs] == [10.0, 20.0, 60.0] and all(r.finished for r in runs)
    unfinished = [r for r in table1.run_files.find_runs([str(grid)]) if r.path.endswith("hum_d4")]
    assert [r.args["seed"] for r in unfinished] == [7, 8] and not any(r.finished for r in unfinished)
    assert [r.score("eval/episode_success") for r in unfinished] == [1.5, 3.5]
