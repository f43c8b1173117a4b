"""Shared test setup: a persistent JAX compilation cache (repeat compiles drop from seconds to ~1 s)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("WANDB_MODE", "disabled")
# Almost every test runs tiny programs whose time is compilation, not execution: XLA's backend
# optimisation level 0 compiles them faster (a cold tiny sac_her run: 59 s instead of 76 s) and
# changes no semantics. Subprocess runs inherit it; the compute-bound learning tests drop it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a baseline's learning test, minutes long; deselected by default, run them with -m slow"
    )
