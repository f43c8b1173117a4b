"""A time-major ring buffer of each env's trajectory ({"state" [C, E, S], "action" [C, E, A], "traj_id"
[C, E], "insert_pos", "size"}) as an OGBench-format file, and back (--save-buffer, --resume)."""

from __future__ import annotations

import os

import jax
import numpy as np

from runkit.files import atomic_file, to_numpy


def buffer_stems(seed: int, num_seeds: int) -> list:
    """Names (without .npz) of the buffer files: "buffer", or one "buffer_s<seed>" per seed."""
    return ["buffer"] if num_seeds == 1 else [f"buffer_s{seed + i}" for i in range(num_seeds)]


def save_buffer(run_path: str, buffer: dict, epoch: int, stem: str = "buffer"):
    """<stem>.npz in OGBench format, env after env, oldest step first: observations [N, state_dim], actions
    [N, A], terminals [N] (1 on the last stored step of each trajectory); `_traj_id` [N] and `_num_envs`
    let --resume rebuild the ring exactly, `_epoch` says which checkpoint it belongs to. The file it
    replaces is kept as <stem>_previous.npz until the next checkpoint names the new one (kill-safe)."""
    buffer = to_numpy(buffer)  # every process gathers; process 0 writes
    if jax.process_index() != 0:
        return
    capacity, num_envs = buffer["traj_id"].shape
    size, insert_pos = int(buffer["size"]), int(buffer["insert_pos"])
    order = (insert_pos - size + np.arange(size)) % capacity
    states = np.swapaxes(buffer["state"][order], 0, 1)  # [E, size, S]
    actions = np.swapaxes(buffer["action"][order], 0, 1)
    traj = np.swapaxes(buffer["traj_id"][order], 0, 1)
    terminals = np.ones_like(traj, dtype=np.float32)
    terminals[:, :-1] = (traj[:, 1:] != traj[:, :-1]).astype(np.float32)
    path = os.path.join(run_path, f"{stem}.npz")
    if os.path.exists(path):
        os.replace(path, os.path.join(run_path, f"{stem}_previous.npz"))
    arrays = {"observations": states.reshape(num_envs * size, -1), "actions": actions.reshape(num_envs * size, -1)}
    arrays |= {"terminals": terminals.reshape(-1), "_traj_id": traj.reshape(-1), "_num_envs": np.asarray(num_envs)}
    with atomic_file(path) as f:
        np.savez(f, **arrays, _epoch=np.asarray(epoch))


def load_buffer(path: str, capacity: int) -> dict:
    """Rebuilds the ring from a saved buffer (logical order placed at physical slots 0..size-1)."""
    data = np.load(path)
    num_envs = int(data["_num_envs"])
    size = data["observations"].shape[0] // num_envs
    unstack = lambda x: np.swapaxes(x.reshape(num_envs, size, *x.shape[1:]), 0, 1)
    buffer = {
        "state": np.zeros((capacity, num_envs, data["observations"].shape[1]), np.float32),
        "action": np.zeros((capacity, num_envs, data["actions"].shape[1]), np.float32),
        "traj_id": np.zeros((capacity, num_envs), np.int32),
    }
    buffer["state"][:size] = unstack(data["observations"])
    buffer["action"][:size] = unstack(data["actions"])
    buffer["traj_id"][:size] = unstack(data["_traj_id"])
    buffer["insert_pos"] = np.asarray(size % capacity, np.int32)
    buffer["size"] = np.asarray(size, np.int32)
    return buffer


def saved_buffers(run_path: str, epoch: int, capacity: int, seed: int, num_seeds: int):
    """The rings saved with the checkpoint of `epoch` (each seed's <stem>.npz or its previous copy), stacked
    along a seed axis when there are several; None unless every seed has one."""
    buffers, stems = [], buffer_stems(seed, num_seeds)
    for stem in stems:
        for name in (f"{stem}.npz", f"{stem}_previous.npz"):
            file = os.path.join(run_path, name)
            if os.path.isfile(file) and int(np.load(file)["_epoch"]) == epoch:
                buffers.append(load_buffer(file, capacity))
                break
    if len(buffers) != len(stems):
        return None
    return buffers[0] if len(buffers) == 1 else jax.tree_util.tree_map(lambda *b: np.stack(b), *buffers)


def save_buffers(run_path: str, buffer: dict, epoch: int, seed: int, num_seeds: int):
    """buffer.npz, or with several seeds (a seed-stacked buffer) one buffer_s<seed>.npz per seed."""
    stems = buffer_stems(seed, num_seeds)
    host = to_numpy(buffer) if num_seeds > 1 else buffer
    for i, stem in enumerate(stems):
        save_buffer(run_path, host if num_seeds == 1 else {k: v[i] for k, v in host.items()}, epoch, stem)
