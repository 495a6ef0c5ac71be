"""`vdvl`: a thin typer app over the `vdvae_latents` library.

Contract (shared with every command): exit 0 on success; exit 2 with one plain
sentence on stderr for bad usage or bad input (no traceback); exit 1 for internal
errors. ``--json`` prints a machine-readable result on stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from vdvae_latents.errors import UserError

app = typer.Typer(
    name="vdvl",
    help="Efficient-VDVAE latents: train, rank latent dimensions by KL, prune, encode, probe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide enough for the tables when piped (rich falls back to 80 columns off a terminal).
out = Console(width=None if sys.stdout.isatty() else 140)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


@app.command()
def presets(
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """List every model preset with its parameter count, image shape and latent sizes."""
    from vdvae_latents.presets import PRESETS, describe

    rows = [describe(p) for p in PRESETS.values()]
    if as_json:
        _print_json(rows)
        return
    table = Table(title="vdvl presets (paper = Table 3 parameter count)")
    table.add_column("name", no_wrap=True)
    for col in ("params", "paper", "image", "layers", "variates", "arch", "output"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        paper = f"{r['paper_parameters_m']}M" if "paper_parameters_m" in r else ""
        c, h, w = r["image_shape"]
        output = f"mol/{r['n_bits']}b" if r["output"] == "mol" else "bern"
        table.add_row(r["name"], f"{r['parameters'] / 1e6:.1f}M", paper, f"{c}x{h}x{w}",
                      str(r["latent_layers"]), str(r["latent_variates"]), r["architecture"], output)
    out.print(table)


@app.command()
def model(
    preset: str = typer.Option("tiny", "--preset", "-p", help="Preset name (see `vdvl presets`)."),
    data: Optional[str] = typer.Option(None, "--data", help="Run an untrained forward pass on these images."),
    n: int = typer.Option(64, "--n", min=1, help="Images for the forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed for the weights and the posterior samples."),
    set_: list[str] = typer.Option([], "--set", help="Override a model field: key=value (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Describe a preset's model (layers, latent sizes, parameters); with --data, score real images.

    The forward pass uses freshly initialised weights: it checks that the model and the
    data fit together and shows the starting loss, not a trained result.
    """
    from vdvae_latents.summary import inspect_model

    overrides = _parse_sets(set_)
    result = inspect_model(preset, data=data, n=n, seed=seed, overrides=overrides)
    if as_json:
        _print_json(result)
        return
    out.print(f"[bold]{result['preset']}[/bold]: {result['parameters']:,} parameters, "
              f"{result['architecture']} architecture, image {result['image_shape']}")
    table = Table(title="latent layers per resolution")
    for col in ("resolution", "layers", "variates/layer", "width", "elements/image"):
        table.add_column(col, justify="right")
    for r in result["resolutions"]:
        table.add_row(f"{r['resolution']}x{r['resolution']}", str(r["layers"]), str(r["variates"]),
                      str(r["width"]), f"{r['elements']:,}")
    out.print(table)
    out.print(f"total: {result['latent_layers']} latent layers, {result['latent_variates']:,} variates, "
              f"{result['latent_elements']:,} latent elements per image")
    if "forward" in result:
        f = result["forward"]
        out.print(f"untrained forward pass on {f['images']} images of '{f['data']}' "
                  f"({f['seconds']:.2f} s): negative ELBO {f['bits_per_dim']:.3f} bits/dim "
                  f"(reconstruction {f['recon_bits_per_dim']:.3f}, KL {f['kl_bits_per_dim']:.4f})")


def _parse_sets(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got '{item}'.")
        pairs[key.strip()] = value.strip()
    return pairs


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: maps errors to the exit-code contract."""
    try:
        result = app(args=argv, prog_name="vdvl", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except UserError as err:
        _fail(str(err))
        return 2
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
        if getattr(err, "exit_code", None) == 2 and hasattr(err, "format_message"):
            ctx = getattr(err, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else "vdvl: "
            _fail(where + _sentence(err.format_message()) + " (see --help).")
            return 2
        raise


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[:1].lower() + text[1:] if text else text


def _fail(message: str) -> None:
    sys.stderr.write(message.rstrip() + "\n")


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
