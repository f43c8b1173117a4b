"""Runtime fixes for brax 0.10.1 under mujoco 3.2.6 (in progress)."""


def apply():
    pass
