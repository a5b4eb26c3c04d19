"""Plain-text tables for the operators' commands: one row a line, columns split by two spaces.

Each cell is one word (``-`` when empty), so ``awk '{print $1}'`` gets the first column.
"""

from collections.abc import Sequence
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

EMPTY = "-"


def cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "_".join(text.split()) or EMPTY


def moment(value: datetime | None) -> str:
    """A time in UTC, to the second: 2025-01-31T12:00:00Z."""
    return EMPTY if value is None else value.astimezone(dt_timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(value: timedelta | None) -> str:
    """How long ago, to a tenth of a second: 1.5s, 3m20s, 2h05m, 3d04h."""
    if value is None:
        return EMPTY
    seconds = max(0.0, value.total_seconds())
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def render(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[index]) for row in [headers, *rows]) for index in range(len(headers))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in [headers, *rows]
    )
