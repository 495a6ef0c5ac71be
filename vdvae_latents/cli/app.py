"""`vdvl`: a thin typer app over the `vdvae_latents` library.

Contract (shared with every command): exit 0 on success; exit 2 with one plain
sentence on stderr for bad usage or bad input (no traceback); exit 1 for internal
errors. ``--json`` prints a machine-readable result on stdout.

Every command is a library call plus printing. The command modules import typer, rich
and the library's ``core`` at the top and everything else inside the command, so
``vdvl --help``, ``vdvl CMD --help`` and every usage error run without importing torch,
scikit-learn or zarr.
"""

from __future__ import annotations

import functools
import sys

import typer

from ..core.errors import UserError
from ..core.interrupts import interrupt_exit, quiet_background_threads, sigterm_as_interrupt
from ..core.runtime import leave_process_group
from . import analysis, data, imports, models, probes, report, scores, stores, training

app = typer.Typer(
    name="vdvl",
    help="Efficient-VDVAE latents: train, rank latent dimensions by KL, prune, encode, probe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# `vdvl import <kind> ...`: models trained by other code bases become ordinary run directories.
import_app = typer.Typer(help="Turn checkpoints of other code bases into vdvl run directories.",
                         no_args_is_help=True)

# In the order `vdvl --help` lists them: the data flow, model -> train -> analyse -> store -> probe.
COMMANDS = [
    ("presets", models.presets),
    ("model", models.model),
    ("train", training.train),
    ("eval", models.eval_),
    ("sample", models.sample),
    ("reconstruct", models.reconstruct),
    ("first-k", models.first_k),
    ("info", models.info),
    ("analyze-kl", analysis.analyze_kl),
    ("encode", stores.encode),
    ("pack", data.pack),
    ("decode", stores.decode),
    ("verify", stores.verify),
    ("probe", probes.probe),
    ("score", scores.score),
    ("ood", scores.ood),
    ("report", report.report),
]


class _Interrupted(Exception):
    """Carries Ctrl-C or SIGTERM (a KeyboardInterrupt) out of a command: typer would turn it into a
    silent exit 130, losing which signal it was and the note the job left on it."""

    def __init__(self, interrupt: KeyboardInterrupt) -> None:
        super().__init__()
        self.interrupt = interrupt


def _passing_interrupts(command):
    @functools.wraps(command)  # typer reads the options from the wrapped signature
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise _Interrupted(exc) from exc

    return run


for name, command in COMMANDS:
    app.command(name)(_passing_interrupts(command))
import_app.command("efficient-vdvae")(_passing_interrupts(imports.efficient_vdvae))
import_app.command("openai-vdvae")(_passing_interrupts(imports.openai_vdvae))
app.add_typer(import_app, name="import")


@functools.cache
def _click_command():
    """The click command typer makes of the app, made once per process: typer would make it again
    on every call, reading every command's signature (35 ms; a notebook or a test suite calling
    main() hundreds of times paid it each time)."""
    return typer.main.get_command(app)


def main(argv: list[str] | None = None, *, process: bool = False) -> int:
    """Console-script entry point: maps errors to the exit-code contract.

    ``process``: this call is the whole process (``run``), which ends when it returns; then an
    interrupt also silences what background threads report while the process winds down."""
    try:
        with sigterm_as_interrupt():  # `kill PID` cleans up as Ctrl-C does (core.interrupts)
            result = _click_command()(args=argv, prog_name="vdvl", standalone_mode=False)
        leave_process_group()  # only after success: a rank that failed must not wait on the others
        return result if isinstance(result, int) else 0
    except UserError as err:
        _fail(str(err))
        return 2
    except _Interrupted as err:
        return _interrupted(err.interrupt, process)
    except KeyboardInterrupt as err:  # one that arrived outside a command (start-up, teardown)
        return _interrupted(err, process)
    except typer.Abort:
        _fail("vdvl: aborted.")
        return 130
    except typer.Exit as err:
        return err.exit_code
    except BrokenPipeError:
        return 0
    except Exception as err:
        # Usage errors (unknown option, bad value) come from typer's bundled click; they
        # carry exit_code 2 and a one-line format_message(). Matched by shape, not class,
        # so the CLI works with typer versions that bundle click and those that import it.
        if type(err).__name__ == "NoArgsIsHelpError":
            return 0  # `vdvl` alone: the help was printed, nothing went wrong
        if getattr(err, "exit_code", None) == 2 and hasattr(err, "format_message"):
            ctx = getattr(err, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else "vdvl: "
            _fail(where + _sentence(err.format_message()) + " (see --help).")
            return 2
        raise


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[:1].lower() + text[1:] if text else text


def _interrupted(exc: KeyboardInterrupt, process: bool) -> int:
    code, message = interrupt_exit(exc)
    if process:
        quiet_background_threads()
    _fail(message)
    return code


def _fail(message: str) -> None:
    sys.stderr.write(message.rstrip() + "\n")


def run() -> None:
    sys.exit(main(process=True))


if __name__ == "__main__":
    run()
