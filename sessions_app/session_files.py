"""A session's scratch files on the media worker's disk, removed as part of its close.

They hold the client's offer (its addresses and fingerprints) and parameters:
the directory is 0700 and each file 0600, whatever the process's umask, so no
other local user can read them.
"""

import os
import shutil
from pathlib import Path


def write_session_files(files_dir: Path, files: dict[str, str]) -> None:
    """Create the session's directory (0700) and write each ``name: text`` in it (0600)."""
    files_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode passes through the umask, and a directory that already existed keeps its own.
    files_dir.chmod(0o700)
    for name, text in files.items():
        descriptor = os.open(files_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "w", newline="") as file:  # an SDP's CRLFs kept as they are
            os.fchmod(descriptor, 0o600)
            file.write(text)


def remove_session_files(files_dir: Path) -> int:
    """Delete the session's directory; how many files it held (0 if it is already gone)."""
    if not files_dir.exists():
        return 0
    count = sum(1 for path in files_dir.rglob("*") if path.is_file())
    shutil.rmtree(files_dir)
    return count
