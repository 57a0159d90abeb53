"""The parts of ``python -m scripts.benchmark`` (scripts/benchmark.py: the command line only).

* ``harness``: the presets, the subprocesses (started, logged, always stopped), a fresh SecantusDB
  per run, the fake Ollama and the API as subprocesses (``Context``), CPU time, the seeded data,
  and one batch processor run measured end to end (``run_processor``);
* ``results``: what a section returns (``SectionResult``: table, notes, targets, chart data);
* the sections, by area: ``batch_throughput`` (1-3: concurrency, overhead, memory),
  ``api_latency`` (4), ``prompt_size`` (5), ``processors`` (6: several processors on one
  collection), ``llm_servers`` (7: several LLM servers);
* ``sections``: the registry of sections in the order they run: adding a section is one entry
  there (its docstring says how);
* ``render``: the Markdown file (earlier runs kept, newest first), the console tables, the chart,
  the machine description.
"""
