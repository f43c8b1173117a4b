"""checkpoint.msgpack: one JSON header line (who wrote it, env, architecture, progress, the run's args),
then the state as flax msgpack. Written atomically; a missing, truncated, corrupted, old-format or
other script's file stops with one line naming it."""

from __future__ import annotations

import dataclasses
import json
import os
import zlib

import flax
import jax
import numpy as np

from runkit.checks import fail
from runkit.files import to_numpy, write_atomic

CHECKPOINT_FILE = "checkpoint.msgpack"
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "deep-crl checkpoint", 1


def checkpoint_path(path: str) -> str:
    """The checkpoint file of a run folder (or the file itself)."""
    return os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path


def read_checkpoint(path: str, script: str, header_only: bool = False):
    """(header, payload bytes) of a checkpoint file or run folder written by `script`."""
    file = checkpoint_path(path)
    old = os.path.join(path, "checkpoint.pkl")
    if not os.path.isfile(file):
        if os.path.isfile(old):
            fail(f"{old}: an old-format (pickle) checkpoint; this {script}.py reads only {CHECKPOINT_FILE}")
        fail(f"{file}: no checkpoint there")
    with open(file, "rb") as f:
        first_line = f.readline(1 << 20)
        payload = b"" if header_only else f.read()
    if first_line.startswith(b"\x80"):
        fail(f"{file}: an old-format (pickle) checkpoint, not loaded (pickles can run code)")
    try:
        header = json.loads(first_line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        fail(f"{file}: not a {CHECKPOINT_FILE} (no '{CHECKPOINT_FORMAT}' header line)")
    if header.get("version") != CHECKPOINT_VERSION:
        fail(f"{file}: checkpoint format version {header.get('version')}; this {script}.py reads {CHECKPOINT_VERSION}")
    if header.get("script") != script:
        fail(f"{file}: written by {header.get('script')}.py, not by {script}.py")
    if not header_only and len(payload) != header["payload_bytes"]:
        fail(f"{file}: truncated ({len(payload)} of {header['payload_bytes']} payload bytes)")
    if not header_only and zlib.crc32(payload) != header["payload_crc32"]:
        fail(f"{file}: corrupted (payload checksum mismatch)")
    return header, payload


def save_checkpoint(run_path: str, script: str, args, state: dict, epoch: int, env_steps: int, wall_time: float):
    """`state` (a dict with the network "params" and whatever a resume needs) to <run>/checkpoint.msgpack.
    Every process calls it (to_numpy gathers); process 0 writes."""
    state = to_numpy(state)
    if jax.process_index() != 0:
        return
    payload = flax.serialization.msgpack_serialize(nested_dict(state))
    config = dataclasses.asdict(args)
    header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "script": script, "env": args.env}
    header["depths"] = {k: v for k, v in config.items() if k.endswith("depth")}
    header["widths"] = {k: v for k, v in config.items() if k in ("width", "repr_dim")}
    header |= {"seed": args.seed, "epoch": epoch, "env_steps": env_steps, "wall_time": wall_time, "args": config}
    header |= {"payload_bytes": len(payload), "payload_crc32": zlib.crc32(payload)}
    write_atomic(os.path.join(run_path, CHECKPOINT_FILE), json.dumps(header).encode() + b"\n" + payload)


def load_checkpoint(path: str, script: str) -> dict:
    """A checkpoint (file or run folder) as {"header", "args", "epoch", "env_steps", "wall_time", "params",
    "state"}: "state" is everything saved (nested dicts of numpy arrays), "params" its network parameters."""
    header, payload = read_checkpoint(path, script)
    try:
        state = flax.serialization.msgpack_restore(payload)
    except Exception as e:  # msgpack raises several types on a bad payload
        fail(f"{checkpoint_path(path)}: unreadable payload ({type(e).__name__})")
    return {
        "header": header,
        "args": header["args"],
        "epoch": header["epoch"],
        "env_steps": header["env_steps"],
        "wall_time": header["wall_time"],
        "params": state["params"],
        "state": state,
    }


def _key_name(key) -> str:
    """A pytree key path entry (dict key, dataclass field, sequence index) as a msgpack map key."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def nested_dict(tree) -> dict:
    """Any pytree as nested dicts of its leaves, keyed by dict key, field name or index: the form flax
    msgpack writes. Unlike flax's to_state_dict it also walks pytrees flax does not know (MJX's Data
    inside the arm envs' states)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        for key in path[:-1]:
            node = node.setdefault(_key_name(key), {})
        node[_key_name(path[-1])] = leaf
    return out


def restore_state(template, saved: dict, path: str):
    """The saved state in the structure of `template` (arrays or shapes); one line if they differ."""
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for key_path, like in paths_and_leaves:
        node = saved
        for key in key_path:
            if not isinstance(node, dict) or _key_name(key) not in node:
                where = jax.tree_util.keystr(key_path)
                fail(f"{checkpoint_path(path)}: its state does not fit this configuration (no {where})")
            node = node[_key_name(key)]
        if np.shape(node) != np.shape(like):
            fail(f"{checkpoint_path(path)}: its arrays' shapes do not fit this configuration")
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)
