"""The ``fedge`` command: wires the command groups advertised under ``fedge.commands`` and is the one
boundary where a :class:`~fedge.errors.FedgeError` becomes a one-line message and an exit code.

Run ``fedge --help``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import traceback
from typing import Annotated

import click
import typer

from fedge.errors import FedgeError

__all__ = ["build_app", "main"]

COMMANDS_GROUP = "fedge.commands"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedge {importlib.metadata.version('fedge')}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details; show tracebacks on errors.")] = False,
) -> None:
    """fedge: training where data and compute are spread out, and where it loses time."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def build_app() -> typer.Typer:
    """The root Typer app with every installed command group attached."""
    app = typer.Typer(
        name="fedge",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    seen: set[str] = set()
    for ep in sorted(importlib.metadata.entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if ep.name in seen:
            continue
        seen.add(ep.name)
        try:
            obj = ep.load()
        except Exception as err:  # noqa: BLE001 - a broken third-party command must not take the CLI down
            print(f"fedge: warning: command {ep.name!r} ({ep.value}) failed to load: {err}", file=sys.stderr)
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=ep.name)
        else:
            app.command(name=ep.name, no_args_is_help=False)(obj)
    return app


def _fail(message: str, code: int) -> int:
    print(f"fedge: error: {message}", file=sys.stderr)
    return code


def _hoist_verbose(argv: list[str]) -> tuple[list[str], bool]:
    # `fedge fl run ... --verbose` means the same as `fedge --verbose fl run ...`: the root owns the flag.
    args = argv[: argv.index("--")] if "--" in argv else argv
    if "--verbose" not in args:
        return argv, bool(args[:1] == ["-v"])
    rest = list(argv)
    rest.remove("--verbose")
    return ["--verbose", *rest], True


def _os_error_line(err: OSError) -> str:
    path = err.filename if err.filename is not None else ""
    cause = err.strerror or str(err) or type(err).__name__
    where = f" {str(path)!r}" if path else ""
    return f"cannot use{where}: {cause}; check the path, its permissions and free space"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 user error, 2 partial result, 3 lost peer, 130 interrupted,
    other: internal)."""
    argv, verbose = _hoist_verbose(sys.argv[1:] if argv is None else list(argv))
    app = build_app()
    try:
        result = app(args=argv, prog_name="fedge", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as err:
        # Typer's rich help prints itself while the error is built; plain click returns the text.
        if err.format_message().strip():
            typer.echo(err.format_message())
        return 0
    except click.UsageError as err:
        hint = f" (see: {err.ctx.command_path} --help)" if err.ctx is not None else ""
        return _fail(f"{err.format_message()}{hint}", 1)
    except click.exceptions.Exit as err:
        return err.exit_code
    except (click.Abort, KeyboardInterrupt):
        print("fedge: interrupted", file=sys.stderr)
        return 130
    except click.ClickException as err:
        return _fail(err.format_message(), 1)
    except FedgeError as err:
        if verbose:
            traceback.print_exc()
        return _fail(str(err), err.exit_code)
    except OSError as err:
        # The user's filesystem (read-only, full, missing, a file for a directory): theirs to fix, exit 1.
        if verbose:
            traceback.print_exc()
        return _fail(_os_error_line(err), 1)
    except Exception as err:  # noqa: BLE001 - the one error boundary: a bug is one line too
        if verbose:
            traceback.print_exc()
        return _fail(f"internal error: {type(err).__name__}: {err} (re-run with --verbose for the traceback)", 70)
    if result == 130:
        # Typer returns 130 for a KeyboardInterrupt no command turned into Interrupted, and says nothing.
        print("fedge: interrupted", file=sys.stderr)
    return result if isinstance(result, int) else 0


