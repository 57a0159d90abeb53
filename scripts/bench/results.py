"""What a benchmark section returns: its table, notes, targets and chart data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SECTIONS = ("concurrency", "overhead", "memory", "api", "prompt", "processors", "servers")
SECTION_TITLES = {
    "concurrency": "1. Concurrency scaling",
    "overhead": "2. Pipeline overhead",
    "memory": "3. Memory",
    "api": "4. API latency",
    "prompt": "5. Prompt size",
    "processors": "6. Several processors",
    "servers": "7. Several LLM servers",
}


# --- results --------------------------------------------------------------------------------


@dataclass
class Target:
    description: str
    measured: str
    passed: bool


@dataclass
class SectionResult:
    key: str
    intro: str
    columns: list[tuple[str, str]]  # (heading, "left" | "right")
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    chart: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return SECTION_TITLES[self.key]


def _f(value: float, digits: int = 1) -> str:
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
