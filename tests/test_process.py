"""Process start: the library patches apply only to the versions they were written for."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from scope_site import process


def test_a_library_version_the_patches_were_not_written_for_stops_the_process(monkeypatch) -> None:
    monkeypatch.setattr(process, "_patched", False)
    monkeypatch.setitem(process.PATCHED_VERSIONS, "aiortc", "0.0.1")
    with pytest.raises(ImproperlyConfigured, match="aiortc 1.16.0 is installed, but this server patches aiortc 0.0.1"):
        process.apply_patches()
    assert process._patched is False


def test_the_pinned_versions_are_the_patched_ones() -> None:
    with open("requirements.txt") as requirements:
        pins = dict(line.strip().split("==") for line in requirements if "==" in line)
    assert {package: pins[package] for package in process.PATCHED_VERSIONS} == process.PATCHED_VERSIONS
