"""Deployment files: .env.example, Dockerfile, docker-compose.yml, the container health check.

No Docker engine runs on our machines, so this checks what can be checked without one:
the files parse, every command they run exists and accepts its arguments, the settings
they set are real settings, and the health check works against a real API.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values

import cli
from config import Settings, env_name, load_settings

ROOT = Path(__file__).resolve().parents[1]
SETTING_NAMES = {env_name(name) for name in Settings.model_fields}


def test_env_example_names_only_real_settings_and_loads():
    text = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert named, "no settings found in .env.example"
    assert named <= SETTING_NAMES, f"unknown settings: {named - SETTING_NAMES}"
    settings = load_settings(environ={}, env_file=ROOT / ".env.example")
    assert settings == load_settings(environ={}, env_file=None)  # it documents the defaults


def test_env_example_holds_no_credentials():
    values = dotenv_values(ROOT / ".env.example")
    for key, value in values.items():
        assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value or ""), f"{key} carries credentials"


def test_env_is_ignored_by_git_and_docker():
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert _dockerignored(".env")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_runs_as_a_non_root_user():
    instructions = _dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    assert instructions[0][0] == "FROM" and "slim" in instructions[0][1]
    user = [arg for kind, arg in instructions if kind == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD")
    [cmd] = [arg for kind, arg in instructions if kind == "CMD"]
    assert cmd == '["python", "main.py"]'
    for kind, arg in instructions:
        if kind in ("ENV", "ARG"):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|://[^/@\s]+:[^/@\s]+@", arg, flags=re.IGNORECASE), arg


def test_the_images_code_is_not_writable_by_the_app_user():
    # Files COPY'd without --chown belong to root (mode 644/755); only the batch files folder is the app's.
    instructions = _dockerfile_instructions()
    for kind, arg in instructions:
        if kind in ("COPY", "ADD"):
            assert "--chown" not in arg and "--chmod" not in arg, arg
        if kind == "RUN":
            for command in re.split(r"&&|;", arg):
                words = command.split()
                if words and words[0] in ("chown", "chmod"):
                    targets = [w for w in words[1:] if not w.startswith("-")][1:]
                    assert targets == ["/app/batch_files"], command
    user_at = [i for i, (kind, _) in enumerate(instructions) if kind == "USER"][-1]
    copies = [i for i, (kind, _) in enumerate(instructions) if kind in ("COPY", "ADD")]
    assert max(copies) < user_at  # everything is in place before the app user takes over


def test_the_image_carries_its_codes_bytecode():
    # PYTHONDONTWRITEBYTECODE and read-only code: without a compile step in the build, every process
    # of the image would compile every module at its start.
    instructions = _dockerfile_instructions()
    compiles = [i for i, (kind, arg) in enumerate(instructions) if kind == "RUN" and "compileall" in arg]
    copies = [i for i, (kind, _) in enumerate(instructions) if kind in ("COPY", "ADD")]
    user_at = [i for i, (kind, _) in enumerate(instructions) if kind == "USER"][-1]
    assert compiles and max(copies) < compiles[-1] < user_at
    assert "/app" in instructions[compiles[-1]][1]

def test_only_the_api_service_has_the_http_health_check():
    # The image carries no HEALTHCHECK: a batch processor started from it would be "unhealthy" for ever.
    assert "HEALTHCHECK" not in [kind for kind, _ in _dockerfile_instructions()]
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    api_check = services["api"]["healthcheck"]
    assert api_check["test"] == ["CMD", "python", "scripts/healthcheck.py"]
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        if name != "api":
            assert "healthcheck.py" not in str(check.get("test")) and "http" not in str(check.get("test"))
    assert "healthcheck" not in services["batch-processor"] and "healthcheck" not in services["ollama-pull"]


def test_compose_pins_the_ollama_image_to_a_tested_version():
    from fakes.ollama import FakeOllama

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    images = {services[name]["image"] for name in ("ollama", "ollama-pull")}
    assert len(images) == 1
    [image] = images
    match = re.fullmatch(r"ollama/ollama:\$\{OLLAMA_IMAGE_TAG:-(\d+\.\d+\.\d+)\}", image)
    assert match, image  # a release number, overridable with OLLAMA_IMAGE_TAG
    # The version whose API the fake Ollama of the test suite reproduces.
    with FakeOllama() as fake:
        import requests

        assert requests.get(f"{fake.url}/api/version", timeout=10).json()["version"] == match[1]
    readme = (ROOT / "README.md").read_text()
    assert "`OLLAMA_IMAGE_TAG`" in readme and match[1] in readme


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore matching: '*' and '?' stay within a path segment, '**' spans any."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last matching rule wins, and a
    rule matching a folder covers everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in _dockerignore_patterns():
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


@pytest.mark.parametrize(
    "path",
    [
        ".env", ".env.local", ".env.production", "config/.env",
        "data/db/WiredTiger.wt", "data/twcs.csv", "data/imported/conversations.json", "data/demo_batch_files/x.json",
        "batch_files/batch_20250924_103000.json", "batch_files/quarantine/batch_1.json", "batch_files/retry_queue.json",
        "reports/summary.csv", "report.png", "twcs.bad_rows.tsv", "results.tsv", "exports/results.tsv",
        "twcs.csv", "answers.json", "conversations.jsonl", "logs/api.log", "run.log",
        ".git/config", ".venv/bin/python", "__pycache__/api.cpython-311.pyc", ".pytest_cache/v/x",
        ".mypy_cache/x", ".ruff_cache/x", "tests/test_api.py", "docs/benchmarks.md", "htmlcov/index.html",
        "fakes/ollama.py",
    ],
)
def test_dockerignore_keeps_secrets_data_and_local_outputs_out_of_the_image(path):
    assert _dockerignored(path), path


def test_dockerignore_keeps_what_the_image_runs():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    needed = [p for p in tracked.splitlines() if not p.startswith(("tests/", "fakes/", "docs/", ".ci/"))
              and "/." not in p and not p.startswith(".") and p.endswith((".py", ".json", ".txt", ".toml"))
              and p != "data/labelled_conversations.json"]  # scripts/evaluate.py's set: not in the API image
    assert "main.py" in needed and "config/taxonomy.json" in needed and "scripts/healthcheck.py" in needed
    assert "data/sample_conversations.json" in needed  # the demo's sample set, part of the code
    assert not [p for p in needed if _dockerignored(p)]


def test_compose_file_parses_and_wires_the_services():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"mongodb", "ollama", "ollama-pull", "api", "batch-processor"}
    for name in ("api", "batch-processor"):
        service = services[name]
        assert service["build"] == "."
        assert set(service["environment"]) <= SETTING_NAMES
        assert service["environment"]["LLM_ENDPOINT"] == "http://ollama:11434"
        assert service["environment"]["MONGODB_CONNECTION_STRING"].startswith("mongodb://mongodb:")
        assert service["depends_on"]["ollama-pull"]["condition"] == "service_completed_successfully"
    assert services["api"]["command"] == ["python", "main.py"]
    assert services["ollama-pull"]["entrypoint"][:2] == ["ollama", "pull"]

    processor = services["batch-processor"]
    command = processor["command"]
    assert command[:2] == ["python", "batch_processor.py"]
    args = cli.build_parser().parse_args(command[2:])  # the flags exist and parse
    assert args.batch_processor_mode == "continuous"
    files_dir = processor["environment"]["BATCH_FILES_DIR"]
    assert any(volume.endswith(":" + files_dir) for volume in processor["volumes"])


@pytest.mark.parametrize("script", ["main.py", "batch_processor.py"])
def test_the_images_commands_run_outside_docker(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def _healthcheck(port: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    env["API_PORT"] = str(port)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "healthcheck.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_healthcheck_passes_against_a_running_api(api_server, tmp_path):
    port = int(api_server.url.rsplit(":", 1)[1])
    result = _healthcheck(port, tmp_path)
    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_when_nothing_answers(tmp_path):
    from tests.net_helpers import free_port

    result = _healthcheck(free_port(), tmp_path)
    assert result.returncode == 1
    assert "unhealthy" in result.stderr


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = sorted(name for name in SETTING_NAMES if f"`{name}`" not in readme)
    assert not missing, f"settings missing from README.md: {missing}"


def test_readme_gives_the_test_command_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make test-llm" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    # The fast suite first, then the real-model tests (issue 10).
    assert ci.strip().splitlines()[-2:] == ["make test", "make test-llm"]
