"""Markdown tables from a results folder written by bench/run_all.sh.

Every figure in every ``<bench>.json`` (a dict with a summary per target)
becomes one row: ``median / p90 / p99 / worst`` per target, and the project's
median ÷ the bare median (embedded · scaled). Other values are listed as they are.

Usage: .venv/bin/python -m bench.report bench/results/<time>
"""

import argparse
import json
from pathlib import Path
from typing import Any

TARGETS = ("embedded", "scaled", "bare")
STATS = ("median", "p90", "p99", "worst")


def _is_summary(value: Any) -> bool:
    return isinstance(value, dict) and "median" in value and "worst" in value


def _is_figure(value: Any) -> bool:
    return isinstance(value, dict) and any(_is_summary(value.get(target)) for target in TARGETS)


def _cell(summary: Any) -> str:
    if not _is_summary(summary):
        return "—"
    return " / ".join(f"{summary[stat]:g}" for stat in STATS)


def _ratio(figure: dict[str, Any]) -> str:
    ratios = figure.get("ratio_to_bare") or {}
    medians = [f"{ratios[t]['median']:g}" if ratios.get(t) and ratios[t].get("median") is not None else "—"
               for t in ("embedded", "scaled")]
    return " · ".join(medians) if ratios else "—"


def rows(value: Any, path: str = "") -> list[str]:
    if _is_figure(value):
        return [f"| {path} | " + " | ".join(_cell(value.get(t)) for t in TARGETS) + f" | {_ratio(value)} |"]
    if isinstance(value, dict):
        return [row for key, inner in value.items() for row in rows(inner, f"{path}.{key}" if path else key)]
    return []


def scalars(value: Any, path: str = "") -> list[str]:
    """Values that are not figures (counts, flags, process readings), as ``path: value`` lines."""
    if _is_figure(value) or _is_summary(value):
        return []
    if isinstance(value, dict):
        return [line for key, inner in value.items() for line in scalars(inner, f"{path}.{key}" if path else key)]
    if isinstance(value, list):
        return [] if len(value) > 8 else [f"- `{path}`: {json.dumps(value)}"]
    return [f"- `{path}`: {json.dumps(value)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    for result in sorted(folder.glob("*.json")):
        text = result.read_text()
        if not text.strip():
            continue
        data = json.loads(text)
        print(f"\n### {result.stem}\n")
        table = rows(data)
        if table:
            print("| figure | embedded | scaled | bare | median ratio (emb · sc) |")
            print("| --- | --- | --- | --- | --- |")
            print("\n".join(table))
        other = [line for line in scalars(data) if not line.startswith("- `steps")]
        if other:
            print()
            print("\n".join(other))


if __name__ == "__main__":
    main()
