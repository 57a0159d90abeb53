"""scripts/api_client.py against the real API server and the fake Ollama server."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from config import Settings
from fakes.ollama import RUNNER_CRASHED, FakeOllama, Reply, last_user_content
from tests.conftest import RunningAPI
from tests.net_helpers import closed_port_url

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "api_client.py"
SAMPLES_FILE = ROOT / "data" / "sample_conversations.json"
SAMPLES = json.loads(SAMPLES_FILE.read_text(encoding="utf-8"))
TAXONOMY = json.loads((ROOT / "config" / "taxonomy.json").read_text(encoding="utf-8"))


def load_client() -> ModuleType:
    spec = importlib.util.spec_from_file_location("api_client", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


api_client = load_client()


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_sample_file_is_classified(
    api_server: RunningAPI, fake_ollama: FakeOllama, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "answers.json"
    code = api_client.main(
        [str(SAMPLES_FILE), "--url", api_server.url + "/", "--output", str(output), "--timeout", "30"]
    )
    out = capsys.readouterr().out

    assert code == 0
    assert fake_ollama.chat_count == len(SAMPLES)
    answers = json.loads(output.read_text(encoding="utf-8"))
    assert [a["conversation_number"] for a in answers] == [str(s["conversation_number"]) for s in SAMPLES]
    intents = {entry["name"] for entry in TAXONOMY["fields"][0]["labels"]}
    for answer, sample in zip(answers, SAMPLES, strict=True):
        assert answer["status"] == 200
        assert answer["tweets"] == sample["tweets"]
        assert answer["classification"]["intent"] in intents
        assert "expected" not in answer and "error" not in answer
    lines = out.strip().splitlines()
    assert len(lines) == len(SAMPLES) + 1
    first = answers[0]["classification"]
    assert lines[0].startswith(f"{SAMPLES[0]['conversation_number']}  200  {first['intent']} | {first['topic']} | ")
    count = len(SAMPLES)
    assert lines[-1] == f"{count} conversation(s): {count} classified, 0 failed; answers written to {output}"


def test_single_object_and_default_output(
    api_server: RunningAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conversation = {"conversation_number": 77, "messages": [{"sender": "Customer", "text": "Refund please"}]}
    input_file = write_json(tmp_path / "one.json", conversation)
    monkeypatch.chdir(tmp_path)
    assert api_client.main([str(input_file), "--url", api_server.url]) == 0
    [answer] = json.loads((tmp_path / "answers.json").read_text(encoding="utf-8"))
    assert answer["conversation_number"] == "77"
    assert answer["messages"] == conversation["messages"]
    assert "1 classified, 0 failed" in capsys.readouterr().out


def test_failures_are_reported_and_saved(
    api_server: RunningAPI, fake_ollama: FakeOllama, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_ollama.responder = lambda body: RUNNER_CRASHED if "crash me" in last_user_content(body) else None
    answer = {"categorization": "x", "intent": "Other", "topic": "Other", "sentiment": "Neutral"}
    fake_ollama.enqueue(Reply(content=json.dumps(answer)))
    conversations = [
        {"conversation_number": "ok-1", "messages": [{"sender": "customer", "text": "hello"}]},
        {"conversation_number": "bad-2", "messages": [{"sender": "robot", "text": "beep"}]},
        {"conversation_number": "crash-3", "messages": [{"sender": "customer", "text": "crash me"}]},
        "not an object",
    ]
    output = tmp_path / "out.json"
    input_file = write_json(tmp_path / "in.json", conversations)
    code = api_client.main([str(input_file), "--url", api_server.url, "--output", str(output)])
    out = capsys.readouterr().out

    assert code == 1
    answers = json.loads(output.read_text(encoding="utf-8"))
    assert [(a["conversation_number"], a["status"]) for a in answers] == [
        ("ok-1", 200),
        ("bad-2", 422),
        ("crash-3", 502),
        (None, 422),
    ]
    assert answers[0]["classification"]["intent"] == "Other"
    assert answers[1]["error"]["field"] == "messages[0].sender"
    assert answers[2]["error"]["type"] == "llm_server_error"
    lines = out.strip().splitlines()
    assert lines[1].startswith("bad-2  422  error invalid_input: Invalid conversation: messages[0].sender")
    assert lines[2].startswith("crash-3  502  error llm_server_error: ")
    assert lines[3].startswith("(no number)  422  error invalid_input")
    assert lines[-1].startswith("4 conversation(s): 1 classified, 3 failed")


def test_api_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    output = tmp_path / "out.json"
    code = api_client.main([str(SAMPLES_FILE), "--url", url, "--output", str(output), "--timeout", "5"])
    assert code == 1
    answers = json.loads(output.read_text(encoding="utf-8"))
    assert len(answers) == len(SAMPLES)
    assert all(a["status"] is None and a["error"]["type"] == "api_unreachable" for a in answers)
    assert url in answers[0]["error"]["message"] and "python main.py" in answers[0]["error"]["message"]
    assert f"0 classified, {len(SAMPLES)} failed" in capsys.readouterr().out


def test_client_timeout(
    make_settings: Callable[..., Settings],
    start_api: Callable[[Settings], RunningAPI],
    fake_ollama: FakeOllama,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    api = start_api(make_settings(ollama_timeout=1))  # the server gives up soon after the client
    fake_ollama.enqueue(Reply(delay=2))
    conversation = {"conversation_number": "slow", "messages": [{"sender": "customer", "text": "hi"}]}
    output = tmp_path / "out.json"
    code = api_client.main(
        [str(write_json(tmp_path / "in.json", conversation)), "--url", api.url]
        + ["--output", str(output), "--timeout", "0.5"]
    )
    assert code == 1
    [answer] = json.loads(output.read_text(encoding="utf-8"))
    assert answer["conversation_number"] == "slow"
    assert (answer["status"], answer["error"]["type"]) == (None, "client_timeout")
    assert "within 0.5 s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "input file not found"),
        ("{not json", "is not valid JSON"),
        ("42", "must hold a JSON object or a list"),
        ("[]", "empty list"),
    ],
)
def test_usage_errors_exit_2_without_traceback(tmp_path: Path, content: str | None, fragment: str) -> None:
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = run_script(str(path), "--url", closed_port_url(), "--output", str(tmp_path / "out.json"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_missing_output_folder_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = api_client.main([str(SAMPLES_FILE), "--output", str(tmp_path / "no" / "such" / "out.json")])
    assert code == 2
    assert "output folder does not exist" in capsys.readouterr().err


def test_bad_timeout_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert api_client.main([str(SAMPLES_FILE), "--timeout", "0", "--output", str(tmp_path / "o.json")]) == 2
    assert "--timeout must be positive" in capsys.readouterr().err


def test_help_documents_every_flag() -> None:
    result = run_script("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for fragment in (
        "INPUT.json",
        "--url URL base URL of the API (default: http://localhost:8000)",
        "--output OUTPUT file the answers are written to",
        "(default: answers.json)",
        "--timeout TIMEOUT seconds to wait for each answer (default: 150.0)",
        "Exit codes: 0 all classified, 1 some failed, 2 usage error.",
    ):
        assert fragment in text


def test_missing_argument_is_a_usage_error() -> None:
    result = run_script()
    assert result.returncode == 2
    assert "INPUT.json" in result.stderr and "Traceback" not in result.stderr
