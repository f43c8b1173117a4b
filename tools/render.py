"""Headless MuJoCo rendering of brax states and writing MP4 / GIF files.

MuJoCo's offscreen renderer needs an OpenGL backend chosen before `mujoco` is imported:
`MUJOCO_GL=osmesa` on CPU machines (Debian/Ubuntu package `libosmesa6`), `MUJOCO_GL=egl` on GPU
machines. `setup_gl()` picks osmesa when nothing is set and no GPU device is visible.
"""

from __future__ import annotations

import os


def osmesa_available() -> bool:
    import ctypes.util

    return ctypes.util.find_library("OSMesa") is not None


def chosen_backend() -> str:
    """MUJOCO_GL if set, else egl where a GPU device is visible, else osmesa."""
    if os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"].lower()
    return "egl" if os.path.exists("/dev/dri") or os.path.exists("/dev/nvidia0") else "osmesa"


def setup_gl() -> str:
    """Chooses the OpenGL backend (osmesa unless MUJOCO_GL says otherwise or a GPU is visible).

    mujoco picks its context class when it is first imported (brax imports it early, usually
    before anyone sets MUJOCO_GL), so the choice is also applied to the already-imported module.
    """
    os.environ["MUJOCO_GL"] = backend = chosen_backend()
    if backend == "osmesa":
        if not osmesa_available():
            raise RuntimeError(
                "MuJoCo offscreen rendering on CPU needs OSMesa: apt-get install libosmesa6 "
                "(or MUJOCO_GL=egl on a GPU machine)"
            )
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    import mujoco.gl_context

    if backend == "osmesa":
        from mujoco.osmesa import GLContext
    elif backend == "egl":
        from mujoco.egl import GLContext
    else:
        return backend
    mujoco.gl_context.GLContext = GLContext
    return backend


def render_frames(
    mj_model,
    qpos_seq,
    goal_seq=None,
    goal_radius=0.1,
    width=480,
    height=360,
    camera="auto",
    root_body=1,
    scene_box=None,
):
    """Renders one RGB frame (uint8 [H, W, 3]) per row of `qpos_seq` ([T, nq]).

    goal_seq ([T, 2 or 3]) adds a translucent green sphere of `goal_radius` (the env's success
    radius) at the commanded goal, so the goal is visible even in envs without a target body;
    2-D goals sit on the floor. camera: "follow" looks at the midpoint of the robot (body
    `root_body`) and the goal, far enough to keep both in view; "overview" looks down on the whole
    scene (mazes); "auto" picks overview for large scenes (mazes), follow otherwise.
    scene_box = (centre xyz, size) frames the overview (e.g. a maze's walls); default: the model's
    bounding statistics, which include the whole floor.
    """
    setup_gl()
    import mujoco
    import numpy as np

    model = mj_model
    if camera == "auto":
        camera = "overview" if model.stat.extent > 12 else "follow"
    if camera not in ("follow", "overview"):
        raise ValueError(f"camera must be 'auto', 'follow' or 'overview', got {camera!r}")
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
    model.vis.global_.offheight = max(model.vis.global_.offheight, height)
    data = mujoco.MjData(model)
    cam = mujoco.MjvCamera()
    mujoco.mjv_defaultFreeCamera(model, cam)
    if camera == "overview":
        centre, size = scene_box if scene_box is not None else (model.stat.center, model.stat.extent)
        cam.lookat[:] = centre
        cam.distance = 1.25 * size  # fovy 45 deg: a square of side `size` fills the view
        cam.elevation, cam.azimuth = -75.0, 90.0
    else:
        cam.elevation, cam.azimuth = -45.0, 90.0
    robot_size = min(0.8 * model.stat.extent, 6.0)
    frames = []
    with mujoco.Renderer(model, height, width) as renderer:
        for t, q in enumerate(np.asarray(qpos_seq)):
            data.qpos[:] = q
            mujoco.mj_forward(model, data)
            goal = None
            if goal_seq is not None:
                goal = np.zeros(3)
                g = np.asarray(goal_seq[t])
                goal[: min(3, g.size)] = g[:3]
                if g.size < 3:
                    goal[2] = goal_radius
            if camera == "follow":
                root = data.xpos[root_body]
                target = root if goal is None else goal
                cam.lookat[:] = 0.5 * (root + target)
                cam.distance = max(robot_size, 1.7 * float(np.linalg.norm(root[:2] - target[:2])))
            renderer.update_scene(data, camera=cam)
            if goal is not None:
                _add_goal_marker(renderer.scene, goal, goal_radius)
            frames.append(renderer.render().copy())
    return frames


def _add_goal_marker(scene, pos, radius):
    import mujoco
    import numpy as np

    if scene.ngeom >= scene.maxgeom:
        return
    mujoco.mjv_initGeom(
        scene.geoms[scene.ngeom],
        mujoco.mjtGeom.mjGEOM_SPHERE,
        np.full(3, radius),
        pos,
        np.eye(3).flatten(),
        np.array([0.1, 0.9, 0.2, 0.5], np.float32),
    )
    scene.ngeom += 1


def write_video(frames, path: str, fps: float) -> None:
    """Writes frames to MP4 (H.264 via imageio-ffmpeg) or GIF, by extension, atomically."""
    import imageio.v2 as imageio

    if not frames:
        raise ValueError("no frames to write")
    root, ext = os.path.splitext(path)
    ext = ext.lower()
    if ext not in (".mp4", ".gif"):
        raise ValueError(f"video path must end in .mp4 or .gif, got {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{root}.tmp{ext}"
    if ext == ".gif":
        imageio.mimsave(tmp, frames, duration=1000.0 / fps, loop=0)
    else:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=7, macro_block_size=8) as w:
            for f in frames:
                w.append_data(f)
    os.replace(tmp, path)
