"""Core: what every other layer may use and nothing above it may be needed for.

Errors the user can fix (:class:`UserError` and its kinds: the CLI's exit 2), atomic file
writes (a reader sees the old file or the complete new one, never a part), the device and
torchrun process-group runtime, and the lazy package APIs. Imports nothing from the rest
of the library, and not torch at import time.
"""

from .lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "errors": ["UserError", "ConfigError", "DataError", "CheckpointError"],
    "atomic": ["atomic_file", "write_text", "save_figure"],
    "runtime": ["DistEnv", "init_distributed", "leave_process_group", "auto_device", "join_processes"],
})
__all__ += ["lazy_exports"]
