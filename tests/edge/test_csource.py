"""C source emission: pure Python structure checks, and real gcc/g++ builds that check the bytes at run time."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedge.edge.csource import c_source

_MAIN_C = r"""
#include <stdint.h>
#include <stdio.h>
#include "model_data.h"
int main(void) {
  unsigned long sum = 0;
  for (unsigned int i = 0; i < g_model_len; ++i) sum = sum * 31u + g_model[i];
  printf("%u %lu %d\n", g_model_len, sum, (int)((uintptr_t)g_model % 16));
  return 0;
}
"""


def _checksum(data: bytes) -> int:
    total = 0
    for b in data:
        total = (total * 31 + b) % 2**64
    return total


def test_c_source_holds_the_bytes_aligned_with_a_length() -> None:
    # Prepare
    data = bytes(range(256)) * 3 + b"\x01"

    # Execute
    source, header = c_source(data, "g_model")

    # Assert
    body = source[source.index("{", source.index("g_model[]")) : source.index("};")]
    parsed = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", body))
    assert parsed == data
    assert "__attribute__((aligned(16))) const unsigned char g_model[]" in source
    assert f"const unsigned int g_model_len = {len(data)};" in source
    assert "extern const unsigned char g_model[];" in header
    assert "extern const unsigned int g_model_len;" in header


@pytest.mark.parametrize("symbol", ["1model", "g-model", "", "a b"])
def test_c_source_rejects_a_symbol_that_is_not_a_c_identifier(symbol: str) -> None:
    with pytest.raises(ValueError, match="C identifier"):
        c_source(b"\x00", symbol)


def _build_and_run(directory: Path, compiler: str, *flags: str) -> str:
    exe = directory / f"check-{compiler.replace('+', 'p')}"
    subprocess.run(
        [compiler, "-Wall", "-Wextra", "-Werror", *flags, "model_data.cc", "main.c", "-o", str(exe)],
        cwd=directory,
        check=True,
        capture_output=True,
        text=True,
    )
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_generated_c_compiles_with_gcc_and_gxx_and_holds_the_model(tmp_path: Path) -> None:
    # Prepare: bytes shaped like a model (odd length, every value)
    data = bytes((i * 7 + 3) % 256 for i in range(5001))
    source, header = c_source(data, "g_model")
    (tmp_path / "model_data.cc").write_text(source)
    (tmp_path / "model_data.h").write_text(header)
    (tmp_path / "main.c").write_text(_MAIN_C)

    # Execute: as C (gcc -x c) and as C++ (g++, main.c compiled as C++ too)
    as_c = _build_and_run(tmp_path, "gcc", "-x", "c")
    as_cxx = _build_and_run(tmp_path, "g++", "-x", "c++") if shutil.which("g++") else as_c

    # Assert: length, content and 16-byte alignment seen by the compiled program
    for length, checksum, misalignment in (as_c, as_cxx):
        assert int(length) == len(data)
        assert int(checksum) == _checksum(data)
        assert int(misalignment) == 0
