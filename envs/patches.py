"""Runtime fixes for the known brax 0.10.1 defects under mujoco 3.2.6.

The paper's stack (brax 0.10.1 + mujoco/mjx 3.2.6) does not run unmodified; the reference asks
users to edit site-packages. We fix the three defects here, at import of `envs`, without touching
any installed file:

(a) `brax.contact.get` calls `mjx.ncon`, removed in mujoco 3.1.5: every spring/positional/
    generalized env with contacts fails with AttributeError. We give brax.contact its own view of
    `mjx` that adds `ncon` (counted from `mjx.make_data(sys).ncon`, which is what it used to return).
(b) `brax.mjx.pipeline._reformat_contact` builds a brax `Contact` from `**data.contact.__dict__`;
    from the second physics step on, that contact already is a brax Contact holding `link_idx` and
    `elasticity`, so they are passed twice (TypeError): every mjx-backend env fails at `step`.
    We drop those two keys before rebuilding.
(c) `brax.io.json.dumps` compares `sys.geom_rgba` (a jax array) with a Python list, a TypeError in
    recent jax: HTML rendering fails. We hand it a System whose `geom_rgba` is a numpy array.

`ORIGINALS` keeps the unpatched callables so tests can show each defect is still present in the
installed library (and notice when a version change makes a patch unnecessary).
"""

from __future__ import annotations

import types

import brax
import numpy as np
from mujoco import mjx

EXPECTED_BRAX_VERSION = "0.10.1"
ORIGINALS: dict[str, object] = {}
_applied = False


class _MjxWithNcon(types.ModuleType):
    """`mujoco.mjx` plus the `ncon(model)` function that brax 0.10.1 expects."""

    def __init__(self):
        super().__init__("mujoco.mjx")

    def __getattr__(self, name):
        return getattr(mjx, name)

    @staticmethod
    def ncon(model) -> int:
        return int(mjx.make_data(model).ncon)


def _reformat_contact(sys, data):
    """brax.mjx.pipeline._reformat_contact without passing link_idx/elasticity twice."""
    import jax.numpy as jp
    from brax.base import Contact

    if data.contact is None:
        return data
    fields = {k: v for k, v in data.contact.__dict__.items() if k not in ("link_idx", "elasticity")}
    geom_body = jp.array(sys.geom_bodyid)
    link_idx = (geom_body[data.contact.geom1] - 1, geom_body[data.contact.geom2] - 1)
    elasticity = jp.zeros(data.contact.pos.shape[0])
    return data.replace(contact=Contact(link_idx=link_idx, elasticity=elasticity, **fields))


def _json_dumps_numpy_rgba(original):
    def dumps(sys, states):
        return original(sys.replace(geom_rgba=np.asarray(sys.geom_rgba)), states)

    dumps.__doc__ = original.__doc__
    return dumps


def apply() -> None:
    """Installs the three fixes once; idempotent."""
    global _applied
    if _applied:
        return
    if brax.__version__ != EXPECTED_BRAX_VERSION:
        # The fixes target 0.10.1 exactly; other versions may not need or accept them.
        import warnings

        warnings.warn(
            f"envs/patches.py targets brax {EXPECTED_BRAX_VERSION}, found {brax.__version__}; "
            "skipping runtime fixes (requirements.txt pins the supported version).",
            stacklevel=2,
        )
        _applied = True
        return

    from brax import contact as brax_contact
    from brax.io import json as brax_json
    from brax.mjx import pipeline as brax_mjx_pipeline

    ORIGINALS["brax.contact.mjx"] = brax_contact.mjx
    ORIGINALS["brax.mjx.pipeline._reformat_contact"] = brax_mjx_pipeline._reformat_contact
    ORIGINALS["brax.io.json.dumps"] = brax_json.dumps

    if not hasattr(mjx, "ncon"):
        brax_contact.mjx = _MjxWithNcon()
    brax_mjx_pipeline._reformat_contact = _reformat_contact
    brax_json.dumps = _json_dumps_numpy_rgba(brax_json.dumps)
    _applied = True
