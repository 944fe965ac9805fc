"""Atomic writes: the destination is either the old file or the complete new one, never a part, never a stray."""

from __future__ import annotations

import pytest

from senri.model.io import atomic_write


def test_atomic_write_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "sub" / "result.json"
    with atomic_write(path) as f:
        f.write("first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_write(path) as f:
            f.write("half of the sec")
            raise RuntimeError("interrupted")
    assert path.read_text() == "first"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left behind
    with atomic_write(path, "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_write(path, "a"):
            pass
