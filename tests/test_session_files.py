"""A session's files are private to the server's user: directory 0700, files 0600, whatever the umask."""

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessions_app.session_files import remove_session_files, write_session_files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o000, 0o022, 0o277], ids=["umask-000", "umask-022", "umask-277"])
def umask(request) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_session_files_are_0600_in_a_0700_directory(tmp_path: Path, umask: int) -> None:
    files_dir = tmp_path / "sessions" / "abc"
    write_session_files(files_dir, {"offer.sdp": "v=0\r\n", "parameters.json": "{}"})
    assert mode(files_dir) == 0o700
    assert {path.name: mode(path) for path in files_dir.iterdir()} == {"offer.sdp": 0o600, "parameters.json": 0o600}
    assert (files_dir / "offer.sdp").read_bytes() == b"v=0\r\n"
    assert remove_session_files(files_dir) == 2


def test_an_existing_directory_and_file_are_made_private(tmp_path: Path) -> None:
    files_dir = tmp_path / "abc"
    files_dir.mkdir(mode=0o755)
    (files_dir / "offer.sdp").write_text("old")
    (files_dir / "offer.sdp").chmod(0o644)
    write_session_files(files_dir, {"offer.sdp": "new"})
    assert (mode(files_dir), mode(files_dir / "offer.sdp")) == (0o700, 0o600)
    assert (files_dir / "offer.sdp").read_text() == "new"
