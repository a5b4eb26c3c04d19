"""A session's scratch files on the media worker's disk, removed as part of its close."""

import shutil
from pathlib import Path


def remove_session_files(files_dir: Path) -> int:
    """Delete the session's directory; how many files it held (0 if it is already gone)."""
    if not files_dir.exists():
        return 0
    count = sum(1 for path in files_dir.rglob("*") if path.is_file())
    shutil.rmtree(files_dir)
    return count
