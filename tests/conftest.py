"""Shared test setup: a persistent JAX compilation cache (repeat compiles drop from seconds to ~1 s)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("WANDB_MODE", "disabled")
# Almost every test runs tiny programs whose time is compilation, not execution: XLA's backend
# optimisation level 0 compiles them faster (a cold tiny sac_her run: 59 s instead of 76 s) and
# changes no semantics. Subprocess runs inherit it; the learning test, which is compute-bound, drops it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a baseline's learning test, minutes long; deselected by default, run them with -m slow")


def pytest_xdist_make_scheduler(config, log):
    """xdist's loadfile hands out files by test count, largest first, which leaves the one-test,
    3-minute learning file to run alone at the end of the suite; start it first instead."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LearningTestFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            for scope in [s for s in self.workqueue if s.endswith("test_crl_learning.py")]:
                self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return LearningTestFirst(config, log)
