"""What a benchmark section returns: its table, notes, targets and chart data."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scripts.tables import Column


@dataclass
class Target:
    description: str
    measured: str
    passed: bool


@dataclass
class SectionResult:
    key: str
    intro: str
    columns: list[Column]  # (heading, "left" | "right")
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    chart: dict[str, Any] = field(default_factory=dict)
    # From the section's entry in sections.SECTIONS (Section.run): its heading and chart panel.
    title: str = ""
    draw: Callable[[Any, dict[str, Any]], None] | None = None


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile of ``values`` (linear interpolation between closest ranks)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    k = (len(ordered) - 1) * p / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)
