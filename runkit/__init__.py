"""The host side of every training script, imported as CleanRL's scripts import cleanrl_utils: the code no
fork of an algorithm edits (the science stays in the scripts). Modules: checks (bad input as one `error:`
line), run (RunFlags, --resume, the run folder, RunLog, the in-epoch progress bar, one line on Ctrl-C),
checkpoint (checkpoint.msgpack), files (never half-written; a full disk is one line), dry_run (--dry-run),
devices (processes, precision, memory, the seed axis, the first-epoch estimate), online (the online scripts'
schedule, checks, shardings and checkpoint layout) and replay_files (--save-buffer)."""

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
