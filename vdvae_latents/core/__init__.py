"""Core: what every other layer may use and nothing above it may be needed for.

Errors the user can fix (:class:`UserError` and its kinds: the CLI's exit 2), atomic file
writes (a reader sees the old file or the complete new one, never a part), the checks of
input and output paths made before any heavy work, the one-writer lock of a run directory
or store, the device and torchrun process-group runtime, and the lazy package APIs. Imports nothing from the rest
of the library, and not torch at import time.
"""

from .lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "errors": ["UserError", "ConfigError", "DataError", "CheckpointError"],
    "atomic": ["atomic_file", "write_text", "save_figure"],
    "outputs": ["prepare_output", "require_input", "require_matplotlib"],
    "writer_lock": ["WriterLock", "check_run_dir_free", "lock_run_dir", "lock_store", "writing_run_dir"],
    "runtime": ["DistEnv", "init_distributed", "launched_rank", "leave_process_group", "auto_device",
                "join_processes"],
})
__all__ += ["lazy_exports"]
