"""--dry-run: what a configuration will cost, before it runs. A script builds its training state from
shapes alone (jax.eval_shape: no parameter is drawn, no env is stepped), AOT-compiles the epoch a real
run would use (same donation, same shardings) and passes the compiled program to `dry_run_report`,
which prints one JSON line. Nothing is written to disk.

FLOPs per SGD step count the Dense layers only: a forward pass of one example through a Dense of kernel
[in, out] costs 2 * in * out. A pass whose parameters get gradients costs 3x its forward (forward,
backward to the inputs, backward to the weights), a pass through a frozen network that only carries
gradients to its input (e.g. the critic under the actor's loss) 2x, a forward-only pass 1x. Not counted:
biases, LayerNorm, activations, the losses, and the recomputation of --remat.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np

FORWARD, INPUT_GRAD, PARAM_GRAD = 1, 2, 3  # multiples of a pass's forward FLOPs, as above
MEMORY_FIELDS = ("argument", "output", "temp", "generated_code", "alias")


def skip_compilation_cache():
    """Compile afresh even where JAX_COMPILATION_CACHE_DIR is set: an executable read back from the
    persistent cache reports no aliased (donated) bytes, and its compile time is not one. jax decides
    once per process whether it uses the cache, so that decision is reset too."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()


def tree_size(tree) -> int:
    """Elements of a pytree of arrays or jax.ShapeDtypeStructs (parameters, for a params tree)."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays or jax.ShapeDtypeStructs."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def as_shapes(tree):
    """jax.ShapeDtypeStructs of a pytree of arrays (host or device): what AOT lowering needs."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def dense_flops(params) -> int:
    """Forward FLOPs of ONE example through every Dense kernel in `params`: 2 x the kernels' elements.
    Stacked kernels count every copy: the scanned residual blocks [depth/4, in, out], twin critics [2, ...]."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return 2 * sum(math.prod(x.shape) for path, x in flat if getattr(path[-1], "key", None) == "kernel")


def dry_run_report(
    args, script: str, compiled, compile_seconds: float, params: dict, flops_per_sgd_step: int, buffer_bytes: int,
    extra=None,
) -> dict:  # fmt: skip
    """The one JSON line of --dry-run, printed to stdout and returned.

    compiled: the epoch's `jax.jit(...).lower(...).compile()`; params: {network name: its params (or
    shapes)}; buffer_bytes: the replay buffer or the dataset the epoch reads. The memory figures are XLA's
    own for this program on this backend, per device. peak_bytes = arguments + outputs - aliased +
    temporaries (donated buffers are updated in place, so they count once); generated code is left out."""
    stats = compiled.memory_analysis()
    memory = {
        f"{name}_bytes": None if stats is None else int(getattr(stats, f"{name}_size_in_bytes"))
        for name in MEMORY_FIELDS
    }
    peak = None
    if stats is not None:
        peak = memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"] + memory["temp_bytes"]
    sizes = {name: tree_size(tree) for name, tree in params.items()}
    report = {"script": script, "params": sizes, "params_total": sum(sizes.values())}
    report |= {"flops_per_sgd_step": int(flops_per_sgd_step), "buffer_bytes": int(buffer_bytes), "memory": memory}
    report |= {"peak_bytes": peak, "peak_gib": None if peak is None else round(peak / 2**30, 3)}
    report |= {"compile_seconds": round(compile_seconds, 3), "backend": jax.default_backend()}
    report |= {"device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(), "jax": jax.__version__}
    report |= {"xla_flags": os.environ.get("XLA_FLAGS", ""), **(extra or {}), "args": dataclasses.asdict(args)}
    print(json.dumps(report), flush=True)
    return report
