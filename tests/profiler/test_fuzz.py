"""Broken input: truncated, mangled and empty files give one clear line naming the file, never a traceback;
in a job the other ranks are still analysed and the exit code says partial."""

from __future__ import annotations

import gzip
import random

import pytest

from fedge.cli.app import main
from fedge.errors import DataError
from fedge.profiler import load_trace


def _good_text(builder) -> str:
    b = builder().step(1, 0, 1000).step(2, 1000, 1000).noise(3)
    for i in range(30):
        b.kernel(f"kernel_{i}", 10 + 60 * i, 40).kernel("ncclKernel_AllReduce_RING_LL_Sum_float", 15 + 60 * i, 30, stream=20)
    import json

    return json.dumps(b.document(), indent=1)


def _variants(text: str) -> dict[str, bytes]:
    raw = text.encode()
    rng = random.Random(7)
    out = {
        "empty": b"",
        "whitespace": b"   \n",
        "not_json": b"hello world",
        "json_number": b"42",
        "no_events_key": b'{"schemaVersion": 1}',
        "truncated_half": raw[: len(raw) // 2],
        "truncated_end": raw[:-3],
        "truncated_header": raw[:20],
        "gzip_truncated": gzip.compress(raw)[:-40],
        "gzip_garbage": b"\x1f\x8b" + bytes(rng.randrange(256) for _ in range(200)),
        "binary": bytes(rng.randrange(256) for _ in range(500)),
    }
    for i in range(6):  # flip bytes at random places
        b = bytearray(raw)
        for _ in range(5):
            b[rng.randrange(len(b))] = rng.choice(b'{}[]",:x\x00')
        out[f"mangled_{i}"] = bytes(b)
    return out


def test_broken_files_raise_one_line_data_error_or_load(tmp_path, builder):
    text = _good_text(builder)
    for name, data in _variants(text).items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(data)
        if name.startswith("mangled_"):  # a mangled byte inside a string value may still be valid JSON
            try:
                load_trace(path, chunk_bytes=256)
            except DataError as err:
                message = str(err)
                assert str(path) in message and "\n" not in message, (name, message)
            continue
        with pytest.raises(DataError) as info:
            load_trace(path, chunk_bytes=256)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, (name, message)


@pytest.mark.parametrize("name", ["empty", "truncated_half", "gzip_truncated", "not_json", "binary"])
def test_cli_on_broken_file_prints_one_line_and_exits_1(tmp_path, builder, capsys, name):
    path = tmp_path / "rank0.json"
    path.write_bytes(_variants(_good_text(builder))[name])
    code = main(["profile", "report", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "warning: command" not in line]  # other groups' load warnings
    assert code == 1
    assert len(err) == 1 and err[0].startswith("fedge: error:") and "rank0.json" in err[0]
    assert "Traceback" not in err[0]


def test_job_with_one_bad_rank_is_partial(tmp_path, builder, capsys):
    good = _good_text(builder)
    (tmp_path / "rank0.json").write_text(good)
    (tmp_path / "rank1.json").write_text(good[: len(good) // 3])
    code = main(["profile", "report", str(tmp_path), "--json"])
    captured = capsys.readouterr()
    import json

    report = json.loads(captured.out)
    assert code == 2
    assert [r["rank"] for r in report["ranks"]] == [0]
    assert len(report["errors"]) == 1 and "rank1.json" in report["errors"][0]["error"]
    assert "skipped unreadable trace" in captured.err and "Traceback" not in captured.err
