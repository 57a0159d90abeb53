"""Fake LLM servers on loopback: Ollama (:mod:`fakes.ollama`) and OpenAI-compatible (:mod:`fakes.openai`).

They speak the real servers' HTTP shapes and are used by the tests (fixtures in tests/conftest.py)
and by the benchmark scripts (``python -m fakes.ollama`` as a subprocess, ``FakeOllama`` in-process):
a package of their own, not part of tests/, so that scripts do not import the test suite. Installed
with the project (pyproject.toml), kept out of the runtime Docker image (.dockerignore).
"""
