"""Files of a run that are never half-written: a temp file, fsynced, renamed over the old one. A write that
fails (a full disk) removes its temp file and stops with one line; the previous file stays intact."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import jax
import numpy as np

from runkit.checks import fail


@contextlib.contextmanager
def atomic_file(path: str):
    """A binary file object whose content replaces `path` only once it is whole on disk. On any error or
    interrupt the temp file is removed; an OSError (e.g. no space left) becomes one `error:` line."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            kept = "the previous one is intact" if os.path.exists(path) else "nothing was written"
            fail(f"cannot write {path}: {e.strerror or e} ({kept})")
        raise


def write_atomic(path: str, data: bytes):
    with atomic_file(path) as f:
        f.write(data)


def to_numpy(tree):
    """Host copies of a tree of arrays. In a multi-process run every process must call it: arrays split
    over processes are gathered first."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def versions() -> dict:
    from importlib import metadata

    out = {name: metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax", "brax", "mujoco")}
    out["python"] = sys.version.split()[0]
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
