"""The ``archpass`` command line: one module per command, registered here.

Results go to stdout (a rich table, or JSON with ``--json``); diagnostics and progress
go to stderr.  Exit codes: 0 success, 1 a requested check failed, 2 bad input or usage.
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

# Each module exposes register(app).  Keep the order: it is the order of `archpass --help`.
COMMANDS = ["inspect", "passes", "apply", "verify", "targets", "calibrate", "optimize", "report"]

app = typer.Typer(
    name="archpass",
    help="Hardware-aware model optimizer: analyze, rewrite, cost-model and search ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        import archpass

        print(f"archpass {archpass.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", help="Print the version and exit.", callback=_version,
                                          is_eager=True)] = False,
) -> None:
    """Hardware-aware model optimizer: analyze, rewrite, cost-model and search ONNX models."""


for _name in COMMANDS:
    importlib.import_module(f"archpass.cli.{_name}").register(app)


def main() -> None:
    """Console-script entry point (usage errors exit 2, as every bad input does)."""
    app()
