"""The CLI boundary: help, version, plugin listing, and one clear line for mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.cli.app import main

FEDGE = str(Path(sys.executable).with_name("fedge"))


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "plugins" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fedge 0.")


def _leaf_commands(group, path=()):  # type: ignore[no-untyped-def]
    import click

    for name, cmd in sorted(getattr(group, "commands", {}).items()):
        if isinstance(cmd, click.Group):
            yield from _leaf_commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def test_every_help_text_is_shown_as_written(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each argument's and option's help appears in ``--help`` (no text dropped by a click/typer mismatch, no
    ``[table]`` eaten as rich markup)."""
    import click
    import typer

    from fedge.cli.app import build_app

    monkeypatch.setenv("COLUMNS", "400")
    checked = 0
    for path, cmd in _leaf_commands(typer.main.get_command(build_app())):
        assert main([*path, "--help"]) == 0
        shown = " ".join(capsys.readouterr().out.split())
        for param in cmd.params:
            if isinstance(param, click.Argument):
                assert param.help, (path, param.name)  # every argument is documented (click 8.5 + typer 0.20 drop it)
            text = " ".join((getattr(param, "help", None) or "").replace("\\[", "[").split())
            if text and not getattr(param, "hidden", False):
                checked += 1
                assert text[:60] in shown, (path, param.name, text)
    assert checked > 100


def test_plugins_json_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {(r["kind"], r["name"]): r for r in rows}
    for key in [("dataset", "digits"), ("dataset", "npz"), ("dataset", "csv"), ("dataset", "image-folder"),
                ("model", "mlp"), ("model", "cnn"), ("model", "tiny-gpt")]:
        assert key in by_name
        assert set(by_name[key]) == {"name", "kind", "distribution", "version", "summary"}
    assert by_name[("model", "cnn")]["distribution"] == "fedge"
    assert by_name[("model", "cnn")]["summary"].startswith("Small CNN")


def test_plugins_kind_filter_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--kind", "dataset"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "tiny-gpt" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plugins", "--kind", "widget"], "unknown plugin kind 'widget'; valid: strategy"),
        (["plugins", "--colour"], "No such option"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["plugins", "--name", "nope"], "no plugin named 'nope'; installed: allreduce"),
        (["plugins", "--kind", "model", "--name", "fedavg"], "no model named 'fedavg'; installed: cnn"),
        (["plugins", "--name"], "requires an argument"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_1(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_exit_codes() -> None:
    ok = subprocess.run([FEDGE, "--version"], capture_output=True, text=True, check=False)
    bad = subprocess.run([FEDGE, "plugins", "--kind", "nope"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0
    assert bad.returncode == 1 and bad.stderr.startswith("fedge: error:")


def test_plugins_name_shows_settings_from_the_config_docs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--kind", "strategy", "--name", "parameter-server", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    options = {o["name"]: o for o in row["options"]}
    assert options["mode"]["type"] == "sync | async" and options["mode"]["default"] == "sync"
    assert options["lr"]["doc"].startswith("Learning rate of SGD")  # inherited, documented once in the base Config


def test_verbose_after_the_command_means_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--kind", "widget", "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "unknown plugin kind 'widget'" in err


def test_an_os_error_from_the_users_filesystem_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedge.cli.plugins as plugins_cli

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", "/data/runs/x")

    monkeypatch.setattr(plugins_cli, "_show_one", full_disk)
    assert main(["plugins", "--name", "cnn"]) == 1
    err = capsys.readouterr().err
    assert err == "fedge: error: cannot use '/data/runs/x': No space left on device; check the path, its permissions and free space\n"
