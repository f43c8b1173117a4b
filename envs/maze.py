"""Mazes for the ant and the humanoid: the same robots and tasks, walled in.

A layout is a list of rows: '1' wall, 'r' start cell, 'g' goal cell, '0' free. Cell (i, j) (row i,
column j) is centred at world (x, y) = (i * scale, j * scale). The walls are the paper's code's
(each wall cell a static box of half-size (0.5, 0.5, 0.25) * scale standing on the floor), built
from as few boxes as possible: runs of wall cells are merged into rectangles (collision work grows
with robot geoms x wall boxes, every substep; ant steps measured 3.6x faster on HARDEST, 8.5x on
U). The robot starts at an 'r' cell centre (uniform among them) plus the robot's own start noise
(ant 0.1, humanoid 0); the goal is a 'g' cell centre, uniform, no noise. The `_eval` layouts keep
'g' only on the far cells.

Stitching (paper Fig. 11, U maze): the corridor cells are numbered by path distance from 'r'
(0..6). Training draws d from {1, 2, 3}, a start cell anywhere on the path and the goal d cells
further on; evaluation starts at 'r' with goals at distance 4, 5 or 6, never seen in training.
"""

from __future__ import annotations

import collections
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from envs.ant import Ant
from envs.humanoid import Humanoid

LAYOUTS = {
    "U": "11111 1rgg1 111g1 1ggg1 11111",
    "U4": "11111 1ggg1 1r1g1 111g1 1g1g1 1ggg1 11111",
    "U5": "11111111 1gggggg1 1r1111g1 111111g1 1g1111g1 1gggggg1 11111111",
    "BIG": "11111111 1rg11gg1 1gg1ggg1 11ggg111 1gg1ggg1 1g1gg1g1 1ggg1gg1 11111111",
    "HARDEST": "111111111111 1rggg1ggggg1 1g11g1g1g1g1 1gggggg1ggg1 1g1111g111g1 1gg1g1ggggg1 "
    "11g1g1g1g111 1gg1ggg1ggg1 111111111111",
}
# Evaluation layouts: only the far goal cells keep 'g'. HARDEST has none. BIG differs per robot.
EVAL_LAYOUTS = {
    "ant": {
        "U": "11111 1r001 11101 1ggg1 11111",
        "U4": "11111 10001 1r101 11101 1g101 1ggg1 11111",
        "U5": "11111111 10000001 1r111101 11111101 1g1111g1 1gggggg1 11111111",
        "BIG": "11111111 1r011gg1 100100g1 11000111 10010001 101g01g1 10gg1gg1 11111111",
    },
    "humanoid": {
        "U": "11111 1r001 11101 1ggg1 11111",
        "U4": "11111 10001 1r101 11101 1g101 1ggg1 11111",
        "U5": "11111111 10000001 1r111101 11111101 1g1111g1 1gggggg1 11111111",
        "BIG": "11111111 1r011gg1 10010gg1 11000111 10010001 101g01g1 10gg1gg1 11111111",
    },
}
SCALE = {"ant": 4.0, "humanoid": 2.0}
STITCH_TRAIN_DISTANCES = (1, 2, 3)
STITCH_EVAL_DISTANCES = (4, 5, 6)
# Collision bits: walls carry bit 2 in contype so robot geoms can be made to hit walls (conaffinity
# bit 2) without also colliding with the floor or each other; bit 1 keeps them hitting any geom
# whose contype is 1 (the ant's feet, every humanoid geom).
WALL_CONTYPE, WALL_CONAFFINITY = 3, 1
ANT_WALL_GEOMS = ("torso_geom", "aux_1_geom", "aux_2_geom", "aux_3_geom", "aux_4_geom")


@dataclass(frozen=True)
class MazeSpec:
    """A parsed layout: cell centres of starts, goals, walls, and the stitching path if any."""

    rows: tuple[str, ...]
    scale: float
    starts: np.ndarray  # [n, 2] world xy
    goals: np.ndarray  # [n, 2]
    walls: np.ndarray  # [n, 2]
    path: np.ndarray | None  # [7, 2] corridor cells by path distance from 'r' (stitching only)
    stitching: str | None


def parse_layout(layout: str, scale: float, stitching: str | None = None) -> MazeSpec:
    rows = tuple(layout.split())
    if len({len(r) for r in rows}) != 1 or set("".join(rows)) - set("10rg"):
        raise ValueError(f"malformed maze layout {layout!r}")
    cells = {
        c: np.array(
            [(i * scale, j * scale) for i, r in enumerate(rows) for j, ch in enumerate(r) if ch == c], dtype=np.float32
        ).reshape(-1, 2)
        for c in "1rg"
    }
    if len(cells["r"]) == 0 or len(cells["g"]) == 0:
        raise ValueError(f"maze layout {layout!r} needs at least one 'r' and one 'g' cell")
    path = None
    if stitching is not None:
        path = scale * np.array(corridor_path(rows), dtype=np.float32)
    return MazeSpec(rows, scale, cells["r"], cells["g"], cells["1"], path, stitching)


def corridor_path(rows: tuple[str, ...]) -> list[tuple[int, int]]:
    """The free cells ordered by path distance from the single 'r' cell; they must form one corridor."""
    starts = [(i, j) for i, r in enumerate(rows) for j, c in enumerate(r) if c == "r"]
    if len(starts) != 1:
        raise ValueError("stitching needs exactly one 'r' cell")
    dist = {starts[0]: 0}
    queue = collections.deque(starts)
    while queue:
        i, j = queue.popleft()
        for n in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
            if n not in dist and rows[n[0]][n[1]] != "1":
                dist[n] = dist[(i, j)] + 1
                queue.append(n)
    order = sorted(dist, key=dist.get)
    if [dist[c] for c in order] != list(range(len(order))):
        raise ValueError("stitching needs a layout whose free cells form a single corridor")
    return order


def maze_mjcf(robot_xml: str, maze: MazeSpec, wall_geoms: tuple[str, ...]) -> str:
    """The robot's MJCF with the walls added, the floor and the target's joint range enlarged."""
    root = ET.fromstring(robot_xml)
    worldbody = root.find("worldbody")
    n_rows, n_cols = len(maze.rows), len(maze.rows[0])
    reach = max(n_rows, n_cols) * maze.scale
    for geom in root.iter("geom"):
        if geom.get("name") == "floor":
            centre = ((n_rows - 1) * maze.scale / 2, (n_cols - 1) * maze.scale / 2)
            geom.set("pos", f"{centre[0]} {centre[1]} 0")
            geom.set("size", f"{reach} {reach} {geom.get('size').split()[2]}")
        if geom.get("name") in wall_geoms:
            geom.set("conaffinity", "2")
    for joint in root.iter("joint"):
        if joint.get("name") in ("target_x", "target_y"):
            joint.set("range", f"{-reach} {reach}")
    for k, (i0, i1, j0, j1) in enumerate(wall_boxes(maze.rows)):
        ET.SubElement(
            worldbody,
            "geom",
            {
                "name": f"wall_{k}",
                "type": "box",
                "pos": f"{(i0 + i1) / 2 * maze.scale} {(j0 + j1) / 2 * maze.scale} {maze.scale / 4}",
                "size": f"{(i1 - i0 + 1) / 2 * maze.scale} {(j1 - j0 + 1) / 2 * maze.scale} {maze.scale / 4}",
                "contype": str(WALL_CONTYPE),
                "conaffinity": str(WALL_CONAFFINITY),
                "rgba": "0.7 0.5 0.3 1",
            },
        )
    return ET.tostring(root, encoding="unicode")


def wall_boxes(rows: tuple[str, ...]) -> list[tuple[int, int, int, int]]:
    """Wall cells merged into rectangles (first row, last row, first column, last column).

    The union is exactly the wall cells; fewer, larger boxes make far fewer collision pairs
    (collision cost grows with robot geoms x wall geoms, every physics substep).
    """
    boxes, open_runs = [], {}
    for i, row in enumerate(list(rows) + ["0" * len(rows[0])]):
        runs = [(m.start(), m.end() - 1) for m in re.finditer("1+", row)]
        for run in list(open_runs):
            if run not in runs:  # the rectangle ends above this row
                boxes.append((open_runs.pop(run), i - 1) + run)
        for run in runs:
            open_runs.setdefault(run, i)
    return sorted(boxes)


def sample_start_goal(maze: MazeSpec, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Start xy (a cell centre) and goal xy for one episode."""
    key_a, key_b = jax.random.split(rng)
    if maze.stitching is None:
        starts, goals = jnp.asarray(maze.starts), jnp.asarray(maze.goals)
        start = starts[jax.random.randint(key_a, (), 0, len(starts))]
        return start, goals[jax.random.randint(key_b, (), 0, len(goals))]
    path = jnp.asarray(maze.path)
    if maze.stitching == "train":
        distance = jnp.asarray(STITCH_TRAIN_DISTANCES)[jax.random.randint(key_a, (), 0, len(STITCH_TRAIN_DISTANCES))]
        start_idx = jax.random.randint(key_b, (), 0, len(path) - distance)
    else:
        distance = jnp.asarray(STITCH_EVAL_DISTANCES)[jax.random.randint(key_a, (), 0, len(STITCH_EVAL_DISTANCES))]
        start_idx = jnp.zeros((), jnp.int32)
    return path[start_idx], path[start_idx + distance]


class AntMaze(Ant):
    substep = 0.005  # x 10 frames: control dt 0.05 s

    def __init__(self, maze: MazeSpec, *, backend: str = "spring", reset_noise_scale: float = 0.1):
        self.maze = maze
        super().__init__(backend=backend, reset_noise_scale=reset_noise_scale)

    def _mjcf(self) -> str:
        return maze_mjcf(super()._mjcf(), self.maze, ANT_WALL_GEOMS)

    def _sample_start_goal(self, rng):
        return sample_start_goal(self.maze, rng)


class HumanoidMaze(Humanoid):
    substep = 0.0015  # x 10 frames: control dt 0.015 s

    def __init__(
        self, maze: MazeSpec, *, backend: str = "spring", reset_noise_scale: float = 0.0, true_inertia_obs: bool = False
    ):
        self.maze = maze
        super().__init__(backend=backend, reset_noise_scale=reset_noise_scale, true_inertia_obs=true_inertia_obs)

    def _mjcf(self) -> str:
        return maze_mjcf(super()._mjcf(), self.maze, ())  # every humanoid geom already has contype 1

    def _sample_start_goal(self, rng):
        return sample_start_goal(self.maze, rng)


def make_maze(robot: str, layout: str, eval: bool = False, stitching: str | None = None, **options):
    """Builds `robot` ('ant' | 'humanoid') in maze `layout`; options go to the robot env
    (backend=..., reset_noise_scale=..., and for the humanoid true_inertia_obs=...). `eval` picks
    the far-goals layout; `stitching` is None, 'train' or 'eval' (U maze only)."""
    if robot not in SCALE:
        raise ValueError(f"robot must be one of {sorted(SCALE)}, got {robot!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if stitching not in (None, "train", "eval"):
        raise ValueError(f"stitching must be None, 'train' or 'eval', got {stitching!r}")
    if stitching is not None and (eval or layout != "U"):
        raise ValueError("stitching is defined for the U layout only and replaces eval=True")
    if eval and layout not in EVAL_LAYOUTS[robot]:
        raise ValueError(f"layout {layout!r} has no eval variant; eval layouts: {sorted(EVAL_LAYOUTS[robot])}")
    text = EVAL_LAYOUTS[robot][layout] if eval else LAYOUTS[layout]
    maze = parse_layout(text, SCALE[robot], stitching)
    env_class = AntMaze if robot == "ant" else HumanoidMaze
    return env_class(maze, **options)


__all__ = ["LAYOUTS", "EVAL_LAYOUTS", "SCALE", "MazeSpec", "make_maze", "parse_layout"]
