"""The one failure record of a child process: written by the child, raised again by the parent."""

from __future__ import annotations

from pathlib import Path

from fedge.errors import ConfigError, RuntimeFailure
from fedge.failure import read_failure, record_failure


def test_a_fedge_error_comes_back_as_itself(tmp_path: Path) -> None:
    path = tmp_path / "errors" / "rank-1.json"
    record_failure(path, ConfigError("batch size must be >= 1, got 0"), where="rank 1")
    failure = read_failure(path)
    assert failure is not None and failure.exit_code == 1
    err = failure.to_error()
    assert isinstance(err, ConfigError) and str(err) == "rank 1: batch size must be >= 1, got 0"
    assert "ConfigError" in failure.traceback or failure.traceback == ""


def test_a_bug_is_a_runtime_failure_with_its_type_named(tmp_path: Path) -> None:
    path = tmp_path / "serverapp.json"
    try:
        {}["weights"]
    except KeyError as err:
        record_failure(path, err, where="serverapp")
    failure = read_failure(path)
    assert failure is not None
    err = failure.to_error()
    assert isinstance(err, RuntimeFailure) and err.exit_code == 70
    assert str(err) == "serverapp: KeyError: 'weights'"
    assert "KeyError" in failure.traceback


def test_a_message_with_an_exit_code(tmp_path: Path) -> None:
    record_failure(tmp_path / "f.json", "peer 2 lost", exit_code=3)
    err = read_failure(tmp_path / "f.json").to_error()  # type: ignore[union-attr]
    assert (type(err), str(err), err.exit_code) == (RuntimeFailure, "peer 2 lost", 3)


def test_missing_or_torn_record_reads_as_none(tmp_path: Path) -> None:
    assert read_failure(tmp_path / "none.json") is None
    (tmp_path / "torn.json").write_text('{"message": "ha')
    assert read_failure(tmp_path / "torn.json") is None
