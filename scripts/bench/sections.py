"""The benchmark's sections, in the order they run: the one place a section is added.

A section is a function ``measure(ctx: Context) -> SectionResult`` (its table, notes, targets and
chart data; its docstring says what it measures and its targets) and, if it draws a chart panel,
``draw(axes, data)`` (``data``: the result's ``chart``). To add one:

1. write the two functions in the module of scripts/bench/ named for what they measure (a new one
   if none fits), using the harness (``ctx.database()``, ``ctx.fake_ollama()``, ``ctx.api()``,
   ``run_processor``; sizes in ``Preset``, with a tiny value in the smoke preset);
2. add one ``Section`` entry to ``SECTIONS`` below: its ``--only`` name, its numbered heading, the
   two functions.

The command line, ``--help``, the Markdown file, the console and the chart take it from there.
tests/test_benchmark.py checks every section's table in the smoke run: add the new one's there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scripts.bench.api_latency import draw_api, section_api
from scripts.bench.batch_throughput import (
    draw_concurrency,
    draw_memory,
    draw_overhead,
    section_concurrency,
    section_memory,
    section_overhead,
)
from scripts.bench.harness import Context
from scripts.bench.llm_servers import draw_servers, section_servers
from scripts.bench.processors import section_processors
from scripts.bench.prompt_size import draw_prompt, section_prompt
from scripts.bench.results import SectionResult


@dataclass(frozen=True)
class Section:
    key: str  # the name --only takes
    title: str  # the heading in the file, the console and the chart
    measure: Callable[[Context], SectionResult]
    draw: Callable[[Any, dict[str, Any]], None] | None = None  # its chart panel (None: none)

    def run(self, ctx: Context) -> SectionResult:
        result = self.measure(ctx)
        result.title, result.draw = self.title, self.draw
        return result


SECTIONS: tuple[Section, ...] = (
    Section("concurrency", "1. Concurrency scaling", section_concurrency, draw_concurrency),
    Section("overhead", "2. Pipeline overhead", section_overhead, draw_overhead),
    Section("memory", "3. Memory", section_memory, draw_memory),
    Section("api", "4. API latency", section_api, draw_api),
    Section("prompt", "5. Prompt size", section_prompt, draw_prompt),
    Section("processors", "6. Several processors", section_processors),
    Section("servers", "7. Several LLM servers", section_servers, draw_servers),
)
SECTION_NAMES = tuple(section.key for section in SECTIONS)
