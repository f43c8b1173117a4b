"""The run folder: flags (with --resume, the run's own), config.json, metrics.jsonl, summary.json, wandb,
the progress bar, the stop on a non-finite loss, and one line on Ctrl-C. Only process 0 writes and logs."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import sys
import time
from typing import Optional

import jax
import numpy as np

from runkit.checkpoint import CHECKPOINT_FILE, checkpoint_path, read_checkpoint, save_checkpoint
from runkit.checks import fail, flag
from runkit.devices import PROGRESS, device_peak_memory
from runkit.files import git_commit, versions, write_atomic


@dataclasses.dataclass(frozen=True)
class RunFlags:
    """The flags of a run's host side, the same in every script: each script's Args extends this class."""

    seed: int = 0
    """random seed (a run is deterministic on CPU for a given seed)"""
    track: bool = False
    """log metrics to wandb (WANDB_MODE=offline works without network)"""
    wandb_project: str = "crl_deep"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team or user)"""
    run_dir: str = "runs"
    """folder that holds one sub-folder per run"""
    run_name: Optional[str] = None
    """default: {env}__{script}__d{depth}__s{seed}__{unix time}"""
    resume: Optional[str] = None
    """continue the run in this folder with its own settings (flags given again must agree, but --track, --wandb-*)"""
    dry_run: bool = False
    """compile the epoch from shapes, print its costs as one JSON line, write nothing (docs/dry_run.md)"""


# free on --resume (the rest must agree with the run); --dry-run plans the resumed run and writes nothing
RUN_FLAGS = tuple(f.name for f in dataclasses.fields(RunFlags) if f.name != "seed")


def parse_args(Args, script: str, argv=None):
    """Args from the command line (tyro). With --resume RUN: the run's own args; flags given again must
    agree with them, except RUN_FLAGS (e.g. --track), which apply and are listed on stderr."""
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    args = tyro.cli(Args, args=argv)
    if args.resume is None:
        return args
    header, _ = read_checkpoint(args.resume, script, header_only=True)
    fields = {f.name for f in dataclasses.fields(Args)}
    unknown = sorted(set(header["args"]) - fields)
    if unknown:
        fail(f"{checkpoint_path(args.resume)}: the run has flags this {script}.py lacks: {', '.join(unknown)}")
    saved = Args(**header["args"])
    given = {name for name in fields for a in argv if a.split("=")[0] in (flag(name), "--no-" + flag(name)[2:])}
    changed = sorted(name for name in given if getattr(args, name) != getattr(saved, name))
    conflicts = [
        f"{flag(n)} {getattr(args, n)!r} (the run has {getattr(saved, n)!r})" for n in changed if n not in RUN_FLAGS
    ]
    if conflicts:
        fail(f"--resume {args.resume}: a resumed run keeps its settings; drop {'; '.join(conflicts)}")
    applied = [n for n in changed if n != "resume"]
    listed = ", ".join(f"{flag(n)} {getattr(args, n)!r} (was {getattr(saved, n)!r})" for n in applied)
    if applied:
        print(f"resume: {listed}", file=sys.stderr)
    return dataclasses.replace(saved, **{n: getattr(args, n) for n in applied}, resume=args.resume)


def open_run(args, script: str, extra_config: Optional[dict] = None) -> str:
    """The run folder: the --resume one, or a new one holding config.json. From here on Ctrl-C stops the
    process with one line naming the last checkpoint and the command that resumes it."""
    if args.resume is not None:
        path = os.path.dirname(os.path.abspath(checkpoint_path(args.resume)))
    else:
        name = args.run_name or f"{args.env}__{script}__d{args.depth}__s{args.seed}__{int(time.time())}"
        path = os.path.join(args.run_dir, name)
        if any(os.path.exists(os.path.join(path, f)) for f in (CHECKPOINT_FILE, "checkpoint.pkl")):
            fail(f"{path} already holds a run; use --resume {path}")
        if jax.process_index() == 0:
            os.makedirs(path, exist_ok=True)
            config = {
                "script": script,
                "args": dataclasses.asdict(args),
                **(extra_config or {}),
                "versions": versions(),
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "git_commit": git_commit(),
            }
            write_atomic(os.path.join(path, "config.json"), json.dumps(config, indent=2).encode())
    _CURRENT.update(script=script, path=path)
    sys.excepthook = _one_line_on_interrupt
    return path


_CURRENT = {"script": None, "path": None, "bar": None, "bar_base": 0}  # the run this process is writing
_DEFAULT_EXCEPTHOOK = sys.excepthook


def resume_hint(script: str, run_path: str) -> str:
    """The last checkpointed epoch and the command that resumes from it (what Ctrl-C and a full disk print)."""
    file = os.path.join(run_path, CHECKPOINT_FILE)
    if not os.path.isfile(file):
        return f"no checkpoint yet: nothing to resume in {run_path}"
    epoch = read_checkpoint(file, script, header_only=True)[0]["epoch"]
    return f"the last checkpoint is epoch {epoch}: resume with python {script}.py --resume {run_path}"


def _one_line_on_interrupt(kind, value, traceback):
    """Ctrl-C, and a full disk wherever a file of the run was being written: one line instead of a traceback."""
    disk_full = issubclass(kind, OSError) and value.errno == errno.ENOSPC
    if (issubclass(kind, KeyboardInterrupt) or disk_full) and _CURRENT["path"] is not None:
        if _CURRENT["bar"] is not None:
            _CURRENT["bar"].close()
        what = f"error: {value.strerror}: {value.filename or _CURRENT['path']}" if disk_full else "interrupted"
        print(f"{what}; {resume_hint(_CURRENT['script'], _CURRENT['path'])}", file=sys.stderr, flush=True)
        return
    _DEFAULT_EXCEPTHOOK(kind, value, traceback)


def progress(step):
    """Inside a jitted epoch: the run's progress bar shows `step` + 1 training steps of the current epoch
    done (a host callback; under vmap or on several devices each copy reports the same step)."""
    if PROGRESS["in_epoch"]:
        jax.debug.callback(_advance, step)


def _advance(step):
    bar = _CURRENT["bar"]
    if bar is not None:
        target = _CURRENT["bar_base"] + int(step) + 1
        if target > bar.n:
            bar.update(target - bar.n)


class RunLog:
    """metrics.jsonl (a line per epoch, a summary line at the end), summary.json, wandb, the progress bar.

    The bar counts training steps (`steps_per_epoch` per epoch; an epoch that calls `progress` moves it
    inside the epoch, others once per epoch). With several seeds (args.num_seeds > 1): a line per epoch
    and seed (a `seed` field), a wandb run per seed in one group, and a summary of each seed and of their
    mean and std. On --resume, lines of epochs after the checkpoint's are dropped first."""

    def __init__(
        self, args, script: str, run_path: str, start_epoch: int, num_epochs: int, steps_per_epoch: int = 1,
        start_time: Optional[float] = None, compile_seconds: Optional[float] = None,
    ):  # fmt: skip
        self.args, self.script, self.run_path = args, script, run_path
        self.start_time = time.time() if start_time is None else start_time  # wall_time counts from here
        self.compile_seconds = compile_seconds  # in the first line this process writes
        self.path = os.path.join(run_path, "metrics.jsonl")
        self.writer = jax.process_index() == 0
        num_seeds = getattr(args, "num_seeds", 1)
        self.seeds = [args.seed + i for i in range(num_seeds)] if num_seeds > 1 else [None]  # None: no seed field
        lines = []
        if args.resume is not None and os.path.isfile(self.path):
            with open(self.path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            lines = [m for m in lines if not m.get("summary") and m["epoch"] < start_epoch]
            if self.writer:
                write_atomic(self.path, "".join(json.dumps(m) + "\n" for m in lines).encode())
        self.eval_history = {seed: [] for seed in self.seeds}  # per seed: the eval metrics of each epoch
        for m in lines:
            self.eval_history[m.get("seed")].append({k: v for k, v in m.items() if k.startswith("eval/")})
        run_name = os.path.basename(os.path.normpath(run_path))
        self.wandb = {}  # seed -> wandb run
        if args.track and self.writer:
            import wandb

            for seed in self.seeds:
                name = run_name if seed is None else f"{run_name}__s{seed}"
                several = {} if seed is None else {"group": run_name, "reinit": "create_new"}
                self.wandb[seed] = wandb.init(
                    project=args.wandb_project,
                    entity=args.wandb_entity,
                    name=name,
                    id=re.sub(r"[^A-Za-z0-9_-]", "-", name)[-64:],  # wandb ids allow only these
                    resume="allow",
                    config={**dataclasses.asdict(args), **({} if seed is None else {"seed": seed})},
                    **several,
                )
        from tqdm import tqdm

        self.start_epoch, self.num_epochs, self.steps_per_epoch = start_epoch, num_epochs, steps_per_epoch
        self.bar = tqdm(
            total=num_epochs * steps_per_epoch,
            initial=start_epoch * steps_per_epoch,
            desc=run_name,
            unit="step" if steps_per_epoch > 1 else "epoch",
            dynamic_ncols=True,
            disable=not self.writer,
        )
        _CURRENT.update(bar=self.bar)

    @property
    def epochs(self):
        """The epochs still to run; the bar's in-epoch progress starts at each."""
        for epoch in range(self.start_epoch, self.num_epochs):
            _CURRENT["bar_base"] = epoch * self.steps_per_epoch
            yield epoch
            self.bar.update((epoch + 1) * self.steps_per_epoch - self.bar.n)

    def check_finite(self, train_metrics, epoch: int):
        """Stops on a non-finite loss (`train_metrics`: a dict, or one per seed), before this epoch's
        checkpoint: the last good one stays."""
        for seed, metrics in zip(self.seeds, [train_metrics] if isinstance(train_metrics, dict) else train_metrics):
            self._check_finite(metrics, epoch, seed)

    def _check_finite(self, train_metrics: dict, epoch: int, seed: Optional[int]):
        bad = [k for k, v in train_metrics.items() if k.endswith("loss") and not math.isfinite(v)]
        if bad:
            self.bar.close()
            file = os.path.join(self.run_path, CHECKPOINT_FILE)
            last_good = (
                f"the last good checkpoint is {file} (epoch {read_checkpoint(file, self.script, True)[0]['epoch']})"
                if os.path.isfile(file)
                else "no checkpoint was written yet"
            )
            where = f"epoch {epoch}" if seed is None else f"epoch {epoch} of seed {seed}"
            fail(f"non-finite {', '.join(bad)} in {where}; stopped, {last_good}")

    def record(self, epoch, env_steps, epoch_seconds, steps, training: dict, evaluation: dict, seed=None) -> dict:
        """One metrics line: progress, wall time, sps (`steps` of the epoch per second), timing, the device's
        peak memory where the backend counts it, then training/* and eval/* (a caller may add more)."""
        first = epoch == self.start_epoch and self.compile_seconds is not None
        return {
            "epoch": epoch,
            **({} if seed is None else {"seed": seed}),
            "env_steps": env_steps,
            "wall_time": time.time() - self.start_time,
            "sps": steps / epoch_seconds,
            "epoch_seconds": epoch_seconds,
            **({"compile_seconds": self.compile_seconds} if first else {}),
            **device_peak_memory(),
            **{f"training/{k}": v for k, v in training.items()},
            **{f"eval/{k}": v for k, v in evaluation.items()},
        }

    def log(self, records, step: int, headline: str):
        """Appends the epoch's record (a list of them, one per seed, with several seeds), sends each to
        wandb at `step`, shows the sps and `headline` (the mean over seeds) on the bar."""
        records = [records] if isinstance(records, dict) else records
        for record in records:
            self.eval_history[record.get("seed")].append({k: v for k, v in record.items() if k.startswith("eval/")})
        if self.writer:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in records))
        for record in records:
            if record.get("seed") in self.wandb:
                self.wandb[record.get("seed")].log(record, step=step)
        head = float(np.mean([record[headline] for record in records]))
        self.bar.set_postfix({"sps": f"{records[0]['sps']:.0f}", headline: f"{head:.3g}"}, refresh=False)

    def checkpoint(self, state: dict, epoch: int, env_steps: int, wall_time: float):
        save_checkpoint(self.run_path, self.script, self.args, state, epoch, env_steps, wall_time)

    def finish(self, env_steps: int) -> dict:
        """The summary: the mean of the last 5 evaluations of every eval metric (suffix _last5). With
        several seeds: each seed's under "seeds" (by seed), their mean as `<metric>_last5` and their
        population std as `<metric>_last5_std`."""
        self.bar.close()
        last5 = {seed: history[-5:] for seed, history in self.eval_history.items()}
        per_seed = {
            seed: {f"{k}_last5": float(np.mean([m[k] for m in tail])) for k in (tail[0] if tail else {})}
            for seed, tail in last5.items()
        }
        summary = {"summary": True, "epochs": len(self.eval_history[self.seeds[0]]), "env_steps": env_steps}
        if self.seeds == [None]:
            summary.update(per_seed[None])
        else:
            keys = per_seed[self.seeds[0]]
            summary["num_seeds"] = len(self.seeds)
            summary.update({k: float(np.mean([per_seed[s][k] for s in self.seeds])) for k in keys})
            summary.update({f"{k}_std": float(np.std([per_seed[s][k] for s in self.seeds])) for k in keys})
            summary["seeds"] = {str(s): per_seed[s] for s in self.seeds}
        if self.writer:
            with open(self.path, "a") as f:
                f.write(json.dumps(summary) + "\n")
            write_atomic(os.path.join(self.run_path, "summary.json"), json.dumps(summary, indent=2).encode())
            print(json.dumps(summary))
        for seed, run in self.wandb.items():
            run.summary.update(summary if seed is None else {**per_seed[seed], "env_steps": env_steps})
            run.finish()
        _CURRENT.update(bar=None)
        return summary
