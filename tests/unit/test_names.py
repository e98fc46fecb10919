"""The one rule for client-chosen names (sidecar.names)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.names import MAX_NAME_BYTES, InvalidNameError, check_name, inside, require_name


@pytest.mark.parametrize("name", ["v1", "base", "lora-2.1_a", "A" * MAX_NAME_BYTES, "0", "_x"])
def test_good_names_pass(name: str) -> None:
    assert check_name("version", name) is None
    assert require_name("version", name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "version: required"),
        ("-rf", "version: must not start with '-'"),
        ("..", "version: must not start with '.'"),
        (".hidden", "version: must not start with '.'"),
        ("a" * (MAX_NAME_BYTES + 1), f"version: longer than {MAX_NAME_BYTES} bytes"),
        ("a/b", "version: must be letters"),
        ("a b", "version: must be letters"),
        ("{data_dir}", "version: must be letters"),
        ("é", "version: must be letters"),
        ("a\x00", "version: must be letters"),
        ("\ud800", "version: must be letters"),
    ],
)
def test_bad_names_are_named(name: str, reason: str) -> None:
    got = check_name("version", name)
    assert got is not None and got.startswith(reason)
    with pytest.raises(InvalidNameError, match=r"^version: "):
        require_name("version", name)


def test_inside_keeps_paths_in_their_folder(tmp_path: Path) -> None:
    assert inside(tmp_path, "a", "b") == (tmp_path / "a" / "b").resolve()
    with pytest.raises(InvalidNameError, match="leaves"):
        inside(tmp_path, "..", "x")
    with pytest.raises(InvalidNameError, match="leaves"):
        inside(tmp_path, "/etc/passwd")
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(InvalidNameError, match="leaves"):
        inside(tmp_path, "link", "etc")
