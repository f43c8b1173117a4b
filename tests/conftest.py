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


# Files whose single test runs for a minute or more. xdist's loadfile hands out files by test count, largest
# first, so such a file would start last and run alone while the other worker idles (~90 s of CI's wall time).
LONG_SINGLE_TEST_FILES = ("test_crl_learning.py",)


def pytest_xdist_make_scheduler(config, log):
    """loadfile's schedule, with LONG_SINGLE_TEST_FILES handed out first."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongFilesFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            for scope in [s for s in self.workqueue if s.endswith(LONG_SINGLE_TEST_FILES)]:
                self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return LongFilesFirst(config, log)
