"""Sweep yamls and the local grid runner (tools/grid.py)."""

import glob
import json
import os
import textwrap

import pytest

from tools import grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = sorted(glob.glob(os.path.join(ROOT, "sweeps", "*.yaml")))


def test_there_are_sweeps_for_the_paper_figures():
    names = {os.path.basename(p) for p in SWEEPS}
    assert {
        "depth.yaml",
        "width_vs_depth__width.yaml",
        "width_vs_depth__depth.yaml",
        "batch_vs_depth.yaml",
        "actor_vs_critic_depth.yaml",
        "depth_small.yaml",
        "table1.yaml",
        "qrl_online_depth.yaml",
        "qrl_offline_depth.yaml",
        "gcbc_offline_depth.yaml",
        "bc_offline_depth.yaml",
    } <= names


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_every_configuration_parses_with_the_script_args(path):
    """Dry run: every grid point's command line goes through the script's tyro Args and check_args."""
    sweep = grid.load_sweep(path)
    runs = grid.expand(sweep)
    assert len(runs) == len({r.name for r in runs}), "two grid points share a run folder"
    expected = 1
    for values in sweep.grid.values():
        expected *= len(values)
    assert len(runs) == expected
    grid.check_args(sweep, runs, "runs", [])


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_local_arguments_are_what_wandb_agent_passes(path):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = grid.load_sweep(path)
    for run in grid.expand(sweep):
        wandb_args = create_sweep_command_args({"args": {k: {"value": v} for k, v in run.params.items()}})
        assert run.argv() == wandb_args["args_no_boolean_flags"]


def test_to_argv_by_hand():
    assert grid.to_argv({"env": "ant", "depth": 8, "lr": 0.0003, "track": True, "cached_reset": False}) == [
        "--env=ant",
        "--depth=8",
        "--lr=0.0003",
        "--track",
    ]


def _write(path, text):
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return str(path)


FAKE_SCRIPT = """
import dataclasses, json, os, sys, tyro

@dataclasses.dataclass
class Args:
    env: str = "reacher"
    depth: int = 4
    seed: int = 0
    num_epochs: int = 3
    run_dir: str = "runs"
    run_name: str = "x"
    resume: str = ""

if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.resume:
        with open(os.environ["CALLS_FILE"], "a") as f:
            f.write("resumed:" + os.path.basename(args.resume) + "\\n")
        json.dump({"summary": True}, open(os.path.join(args.resume, "summary.json"), "w"))
        sys.exit(0)
    if args.depth == 12:
        sys.exit(3)
    with open(os.environ["CALLS_FILE"], "a") as f:
        f.write(args.run_name + "\\n")
    d = os.path.join(args.run_dir, args.run_name)
    os.makedirs(d)
    json.dump({"script": "fake", "args": vars(args)}, open(os.path.join(d, "config.json"), "w"))
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for e in range(args.num_epochs):
            line = {"epoch": e, "env_steps": 100 * (e + 1), "eval/episode_success": e * args.depth}
            f.write(json.dumps(line) + "\\n")
    json.dump({"summary": True}, open(os.path.join(d, "summary.json"), "w"))
"""


def _sweep_yaml(tmp_path, depths):
    program = _write(tmp_path / "fake.py", FAKE_SCRIPT)
    return _write(
        tmp_path / "two.yaml",
        f"""
        name: two
        program: {program}
        method: grid
        command: ["${{env}}", "${{interpreter}}", "${{program}}", "${{args_no_boolean_flags}}"]
        parameters:
          env: {{value: ant}}
          depth: {{values: {depths}}}
          num_epochs: {{value: 50}}
        """,
    )


def test_grid_runner_runs_a_two_point_grid_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("CALLS_FILE", str(calls))
    path = _sweep_yaml(tmp_path, [4, 8])
    runs_dir = str(tmp_path / "runs")
    argv = [path, "--runs-dir", runs_dir, "--set", "num_epochs=2", "--parallel", "2"]
    assert grid.main(argv) == 0
    assert sorted(calls.read_text().split()) == ["two__depth-4", "two__depth-8"]
    lines = (tmp_path / "runs" / "two__depth-8" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["eval/episode_success"] for line in lines] == [0, 8]  # --set reached the run
    # second call: both finished -> nothing runs again
    assert grid.main(argv) == 0
    assert len(calls.read_text().split()) == 2
    assert capsys.readouterr().out.count("skip (finished)") == 2


def test_grid_runner_reports_failures_and_moves_interrupted_runs_aside(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CALLS_FILE", str(tmp_path / "calls.txt"))
    path = _sweep_yaml(tmp_path, [4, 12])
    runs_dir = tmp_path / "runs"
    (runs_dir / "two__depth-4").mkdir(parents=True)  # an interrupted attempt (no summary.json)
    assert grid.main([path, "--runs-dir", str(runs_dir)]) == 1  # depth 12 exits 3
    assert (runs_dir / "two__depth-4" / "summary.json").exists()
    assert len(glob.glob(str(runs_dir / "two__depth-4.interrupted-*"))) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "(exit 3)" in failed[0] and "two__depth-12" in failed[0]
    assert not (runs_dir / "two__depth-12" / "summary.json").exists()


def test_grid_runner_resumes_a_run_that_has_a_checkpoint(tmp_path, monkeypatch, capsys):
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("CALLS_FILE", str(calls))
    path = _sweep_yaml(tmp_path, [4, 8])
    runs_dir = tmp_path / "runs"
    (runs_dir / "two__depth-8").mkdir(parents=True)
    (runs_dir / "two__depth-8" / "checkpoint.pkl").write_bytes(b"x")  # interrupted after epoch 0
    assert grid.main([path, "--runs-dir", str(runs_dir)]) == 0
    assert sorted(calls.read_text().split()) == ["resumed:two__depth-8", "two__depth-4"]
    assert "resume           two__depth-8" in capsys.readouterr().out
    assert not glob.glob(str(runs_dir / "*.interrupted-*"))


def test_set_false_is_refused(tmp_path, capsys):
    assert grid.main([_sweep_yaml(tmp_path, [4]), "--set", "track=false", "--dry-run"]) == 2
    assert "--no-KEY" in capsys.readouterr().err


def test_only_filters_and_names_are_stable(tmp_path):
    sweep = grid.load_sweep(_sweep_yaml(tmp_path, [4, 8, 16]))
    runs = grid.expand(sweep, only={"depth": ["8", "16"]}, overrides={"num_epochs": 1})
    assert [r.name for r in runs] == ["two__depth-8", "two__depth-16"]
    assert runs[0].params == {"env": "ant", "depth": 8, "num_epochs": 1}


@pytest.mark.parametrize(
    "body, message",
    [
        (
            'program: x.py\nparameters: {depth: {values: [4]}}\ncommand: ["${program}", "${args}"]',
            "args_no_boolean_flags",
        ),
        ("program: x.py\nmethod: bayes\nparameters: {depth: {values: [4]}}", "grid"),
        ("program: x.py\nparameters: {depth: {min: 4, max: 8}}", "'value' or 'values'"),
        ("program: x.py\nparameters: {track: {value: false}}", "False is dropped"),
        ("parameters: {depth: {value: 4}}", "program"),
        ("program: x.py\nparameters: [", "invalid yaml"),
    ],
)
def test_bad_sweep_fails_with_one_line(tmp_path, capsys, body, message):
    path = _write(tmp_path / "bad.yaml", body)
    assert grid.main([path, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_dry_run_rejects_a_configuration_the_script_rejects(tmp_path, capsys):
    program = _write(tmp_path / "fake.py", FAKE_SCRIPT)
    path = _write(tmp_path / "s.yaml", f"program: {program}\nparameters: {{depth: {{value: four}}}}\n")
    assert grid.main([path, "--dry-run"]) == 2
    assert "tyro rejected --depth=four" in capsys.readouterr().err
