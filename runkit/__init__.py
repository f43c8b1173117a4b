"""The host side of every training script, imported as CleanRL's scripts import cleanrl_utils: the code no
fork of an algorithm edits. The science (networks, losses, buffers, the jitted epoch) stays in the scripts.

    checks        fail, check_common: bad input as one `error:` line, before anything compiles
    run           RunFlags (the host flags every Args extends), parse_args (--resume), open_run (config.json,
                  one line on Ctrl-C), RunLog (metrics.jsonl, summary, wandb, progress bar, the stop on a
                  non-finite loss), progress (in-epoch bar)
    checkpoint    checkpoint.msgpack: save_checkpoint, load_checkpoint, read_checkpoint, restore_state
    files         write_atomic / atomic_file (never half-written; a full disk is one line), to_numpy
    dry_run       dry_run_report and its FLOP and byte counts (--dry-run)
    devices       init_distributed, apply_matmul_precision, log_backend, device_peak_memory, data_mesh,
                  compile_beside, the seed axis (per_seed, seed_keys, eval_key, seed_rows), estimate_epoch
    online        the online scripts' schedule (prefill_unrolls, train_steps_per_epoch), check_online,
                  carry_shardings, checkpoint_state, resumed_carry, over_seeds
    replay_files  a ring buffer as an OGBench-format file and back (--save-buffer)
"""

from runkit.checkpoint import checkpoint_path, load_checkpoint, read_checkpoint, restore_state, save_checkpoint
from runkit.checks import check_common, fail, flag
from runkit.devices import (
    apply_matmul_precision,
    compile_beside,
    data_mesh,
    device_peak_memory,
    estimate_epoch,
    eval_key,
    init_distributed,
    log_backend,
    per_seed,
    seed_keys,
    seed_rows,
)
from runkit.dry_run import (
    FORWARD,
    INPUT_GRAD,
    PARAM_GRAD,
    as_shapes,
    dense_flops,
    dry_run_report,
    skip_compilation_cache,
    tree_bytes,
    tree_size,
)
from runkit.files import atomic_file, to_numpy, write_atomic
from runkit.online import (
    carry_shardings,
    check_online,
    checkpoint_state,
    over_seeds,
    prefill_unrolls,
    resumed_carry,
    train_steps_per_epoch,
)
from runkit.replay_files import buffer_stems, load_buffer, save_buffer, save_buffers, saved_buffers
from runkit.run import RunFlags, RunLog, open_run, parse_args, progress
