"""Run a sweep yaml's grid locally, without a wandb server.

The same `sweeps/*.yaml` file drives `wandb sweep` (server) and this runner (no server): every
combination of the `parameters` values becomes one run of `program` in `<runs-dir>/<run name>/`.
Runs whose folder already holds `summary.json` (written by the scripts when a run ends normally)
are skipped; a run interrupted after its first checkpoint continues with the script's `--resume`;
so an interrupted grid is finished by running the same command again.

    python -m tools.grid sweeps/depth.yaml --dry-run                  # list the runs, parse each Args
    python -m tools.grid sweeps/depth.yaml --only env=ant_u4_maze --set num_epochs=2 --parallel 2

`--set key=value` overrides a parameter for every run (tiny budgets for a smoke test). Overrides are
not part of the run name: use a separate `--runs-dir` for smoke tests so they never count as the
real runs. Extra arguments after `--` go to every run unchanged (e.g. `-- --track`).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as python tools/<name>.py too

import argparse
import importlib.util
import itertools
import json
import re
import subprocess
import time
from dataclasses import dataclass

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WANDB_ARGS_MACRO = "${args_no_boolean_flags}"


@dataclass
class Sweep:
    """One parsed sweep file: its grid as an ordered dict of value lists."""

    path: str
    name: str
    program: str
    grid: dict  # parameter name -> list of values, in file order


@dataclass
class Run:
    """One point of the grid."""

    name: str
    params: dict

    def argv(self) -> list[str]:
        return to_argv(self.params)


def load_sweep(path: str) -> Sweep:
    """Parses and validates a sweep yaml; raises ValueError with one line on any defect."""
    with open(path) as f:
        spec = yaml.safe_load(f)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: not a yaml mapping")
    for key in ("program", "parameters"):
        if key not in spec:
            raise ValueError(f"{path}: missing top-level key {key!r}")
    if spec.get("method", "grid") != "grid":
        raise ValueError(f"{path}: method is {spec['method']!r}; the local runner only expands grids")
    command = spec.get("command")
    if command is not None and WANDB_ARGS_MACRO not in command:
        # `${args}` passes booleans as --flag=True, which tyro rejects.
        raise ValueError(f"{path}: command must pass parameters with {WANDB_ARGS_MACRO}")
    grid = {}
    for name, p in spec["parameters"].items():
        if not isinstance(p, dict) or not ({"value", "values"} & set(p)):
            raise ValueError(f"{path}: parameter {name!r} needs 'value' or 'values' for a grid")
        values = p["values"] if "values" in p else [p["value"]]
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: parameter {name!r}: 'values' must be a non-empty list")
        for v in values:
            if not isinstance(v, (bool, int, float, str)):
                raise ValueError(
                    f"{path}: parameter {name!r}: value {v!r} is not a scalar (wandb would pass "
                    f"--{name}={v}, which the scripts cannot parse)"
                )
            if v is False:
                raise ValueError(
                    f"{path}: parameter {name!r}: False is dropped by {WANDB_ARGS_MACRO}; "
                    f"leave the default or use a --no-... value in the script"
                )
        grid[name] = values
    name = spec.get("name") or os.path.splitext(os.path.basename(path))[0]
    return Sweep(path=path, name=name, program=spec["program"], grid=grid)


def to_argv(params: dict) -> list[str]:
    """CLI arguments exactly as wandb's ${args_no_boolean_flags} writes them (`wandb agent` builds
    them with wandb.sdk.launch.sweeps.utils.create_sweep_command_args): `--k=v`, `--flag` for True,
    nothing for False. So a sweep must never rely on False to turn a default-on flag off."""
    argv = []
    for key, value in params.items():
        if isinstance(value, bool):
            if value:
                argv.append(f"--{key}")
        else:
            argv.append(f"--{key}={value}")
    return argv


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(value)).strip("-")


def expand(sweep: Sweep, only: dict | None = None, overrides: dict | None = None) -> list[Run]:
    """Every grid point, in file order, filtered by `only` (name -> allowed strings).

    The run name holds the sweep name and every parameter that takes more than one value, so the
    same point always maps to the same folder (that is what makes skipping finished runs work).
    """
    only = only or {}
    overrides = overrides or {}
    unknown = set(only) - set(sweep.grid)
    if unknown:
        raise ValueError(f"--only names unknown parameter(s) {sorted(unknown)}; known: {list(sweep.grid)}")
    varied = [k for k, v in sweep.grid.items() if len(v) > 1]
    runs = []
    for combo in itertools.product(*sweep.grid.values()):
        params = dict(zip(sweep.grid, combo))
        if any(str(params[k]) not in allowed for k, allowed in only.items()):
            continue
        name = "__".join([sweep.name] + [f"{k}-{_slug(params[k])}" for k in varied])
        runs.append(Run(name=name, params={**params, **overrides}))
    return runs


def is_finished(runs_dir: str, run: Run) -> bool:
    return os.path.exists(os.path.join(runs_dir, run.name, "summary.json"))


def can_resume(runs_dir: str, run: Run) -> bool:
    """Interrupted after at least one checkpoint: the script's --resume continues it."""
    # checkpoint.pkl: a run of the old format, which the script's --resume then names in a one-line error
    return not is_finished(runs_dir, run) and any(
        os.path.exists(os.path.join(runs_dir, run.name, name)) for name in ("checkpoint.msgpack", "checkpoint.pkl")
    )


def command(sweep: Sweep, run: Run, runs_dir: str, python: str, extra: list[str], resume: bool = False) -> list[str]:
    program = sweep.program if os.path.isabs(sweep.program) else os.path.join(ROOT, sweep.program)
    if resume:  # the scripts restore their args from the checkpoint
        return [python, program, f"--resume={os.path.join(runs_dir, run.name)}", *extra]
    return [python, program, *run.argv(), f"--run-dir={runs_dir}", f"--run-name={run.name}", *extra]


def check_args(sweep: Sweep, runs: list[Run], runs_dir: str, extra: list[str]) -> None:
    """Parses every run's command line with the program's own tyro `Args` and, where the script has
    one, its `check_args` (the script is imported as a module, so its `__main__` block does not run).
    Raises ValueError naming the first bad run."""
    import tyro

    program = sweep.program if os.path.isabs(sweep.program) else os.path.join(ROOT, sweep.program)
    if not os.path.exists(program):
        raise ValueError(f"{sweep.path}: program {sweep.program!r} does not exist")
    module_name = "_grid_check_" + re.sub(r"\W", "_", os.path.abspath(program))
    module = sys.modules.get(module_name)
    if module is None:
        if os.path.dirname(program) not in sys.path:  # the script imports `envs` from beside it
            sys.path.insert(0, os.path.dirname(program))
        spec = importlib.util.spec_from_file_location(module_name, program)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    for run in runs:
        argv = command(sweep, run, runs_dir, "python", extra)[2:]
        try:
            parsed = tyro.cli(module.Args, args=argv)
        except SystemExit as e:
            raise ValueError(f"run {run.name}: tyro rejected {' '.join(argv)} (exit {e.code})") from None
        if hasattr(module, "check_args"):  # the script's own early validation (env ids, depth % 4...)
            try:
                module.check_args(parsed)
            except SystemExit as e:
                raise ValueError(f"run {run.name}: {e.code}") from None


def _parse_pairs(items: list[str], what: str) -> dict:
    pairs = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what} expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        pairs.setdefault(key, []).append(value)
    return pairs


def _yaml_scalar(text: str):
    """`--set num_epochs=2` -> 2; true/false -> bool; anything else stays a string."""
    return yaml.safe_load(text) if text else text


def run_all(sweep, runs, runs_dir, python, extra, parallel) -> int:
    """Runs what is not finished yet, `parallel` at a time; returns the number of failed runs."""
    os.makedirs(os.path.join(runs_dir, "_logs"), exist_ok=True)
    todo = []
    for run in runs:
        if is_finished(runs_dir, run):
            print(f"skip (finished)  {run.name}", flush=True)
            continue
        resume = can_resume(runs_dir, run)
        stale = os.path.join(runs_dir, run.name)
        if not resume and os.path.exists(stale):  # died before its first checkpoint: keep it aside
            os.replace(stale, f"{stale}.interrupted-{int(time.time())}")
        todo.append((run, resume))
    failed, active = 0, []
    pending = list(todo)
    while pending or active:
        while pending and len(active) < parallel:
            run, resume = pending.pop(0)
            log_path = os.path.join(runs_dir, "_logs", run.name + ".log")
            log = open(log_path, "a")
            cmd = command(sweep, run, runs_dir, python, extra, resume)
            print(f"{'resume' if resume else 'start':<16} {run.name}  (log: {log_path})", flush=True)
            active.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time()))
        time.sleep(0.2)
        for item in list(active):
            run, proc, log, started = item
            if proc.poll() is None:
                continue
            log.close()
            active.remove(item)
            ok = proc.returncode == 0 and is_finished(runs_dir, run)
            failed += not ok
            status = "done" if ok else f"FAILED (exit {proc.returncode})"
            print(f"{status:<16} {run.name}  {time.time() - started:.0f}s", flush=True)
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="path of a sweep yaml (sweeps/*.yaml)")
    parser.add_argument("--runs-dir", default="runs", help="parent folder of the run folders")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep grid points where KEY equals VALUE (repeat a key to allow several)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter in every run (not part of the run name)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the commands and parse each with the program's tyro Args; run nothing",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the runs")
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    try:
        if args.parallel < 1:
            raise ValueError("--parallel must be >= 1")
        sweep = load_sweep(args.sweep)
        only = _parse_pairs(args.only, "--only")
        overrides = {k: _yaml_scalar(v[-1]) for k, v in _parse_pairs(args.set, "--set").items()}
        if any(v is False for v in overrides.values()):
            raise ValueError("--set KEY=false would be dropped like in wandb; pass -- --no-KEY instead")
        runs = expand(sweep, only, overrides)
        if not runs:
            raise ValueError("no grid point matches --only")
        if args.dry_run:
            check_args(sweep, runs, args.runs_dir, extra)
    except yaml.YAMLError as e:
        print(f"error: {args.sweep}: invalid yaml: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for run in runs:
            done = "finished" if is_finished(args.runs_dir, run) else "todo"
            print(
                json.dumps(
                    {
                        "run": run.name,
                        "status": done,
                        "command": command(
                            sweep, run, args.runs_dir, args.python, extra, can_resume(args.runs_dir, run)
                        ),
                    }
                )
            )
        print(f"{len(runs)} runs; every command line parses with {sweep.program}'s Args", file=sys.stderr)
        return 0
    failed = run_all(sweep, runs, args.runs_dir, args.python, extra, args.parallel)
    print(f"{len(runs)} runs in grid, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
