"""The floor of section 4: the least a FastAPI service that calls the model does.

``python -m scripts.bench.floor_api --port P --llm URL`` serves ``POST /classify`` under uvicorn
(the same uvicorn, FastAPI and requests as ``main.py``): it parses the JSON body, posts the
request body the API would send for that conversation (built once at start-up from this tree's
classifier, looked up by ``conversation_number``) to the model server with one ``requests.Session``
in a worker thread, and answers the model's message in a JSON object. No validation, no prompt
building, no answer parsing, no slots, no middleware, no logging: what it adds to the model
server's own latency is what the stack costs before any of the API's work, the floor under the
API's added latency (issue 19 asks for at most 1.5 ms).

``--client aiohttp`` posts with one ``aiohttp.ClientSession`` on the event loop instead (no worker
thread): the floor of a FastAPI service that left the design's synchronous wrapper (DESIGN.md
section 1: the API calls the model through ``llm_wrapper``, requests), to show what that choice
costs and what it would not win back.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import requests
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aggregator import validate_conversation
from classifier import ConversationClassifier
from config import load_settings
from llm_wrapper import provider_for
from scripts.bench.harness import MODEL, load_samples


def build_app(llm_url: str, client: str = "requests") -> FastAPI:
    settings = load_settings({"llm_endpoint": llm_url, "llm_model": MODEL}, environ={}, env_file=None)
    classifier = ConversationClassifier.from_settings(settings)
    provider = provider_for(settings)
    payloads = {
        str(body["conversation_number"]): json.dumps(provider.build_payload(
            settings, classifier.prepare(validate_conversation(body)).messages, classifier.schema)).encode()
        for body in load_samples()
    }
    url = f"{llm_url}{provider.chat_path}"
    session = requests.Session()
    session.trust_env = False  # as the API's client: the environment read once, not per call

    def call(number: str) -> Any:
        response = session.post(url, data=payloads[number], headers={"Content-Type": "application/json"}, timeout=30)
        return json.loads(response.content)

    sessions: list[Any] = []  # --client aiohttp: its session, opened on the server's loop by the lifespan

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if client == "aiohttp":
            import aiohttp

            async with aiohttp.ClientSession() as aiohttp_session:
                sessions.append(aiohttp_session)
                yield
        else:
            yield

    async def call_async(number: str) -> Any:
        async with sessions[0].post(url, data=payloads[number], headers={"Content-Type": "application/json"},
                                    timeout=30) as response:
            return json.loads(await response.read())

    async def call_in_thread(number: str) -> Any:
        return await run_in_threadpool(call, number)

    post = call_async if client == "aiohttp" else call_in_thread
    app = FastAPI(lifespan=lifespan)

    @app.post("/classify")
    async def classify(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        number = str(body["conversation_number"])
        answer = await post(number)
        return JSONResponse({"conversation_number": number, "classification": answer.get("message")})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="loopback port to serve on")
    parser.add_argument("--llm", required=True, help="the model server's URL (the fake Ollama)")
    parser.add_argument("--client", choices=("requests", "aiohttp"), default="requests",
                        help="requests in a worker thread (the design's, default) or aiohttp on the event loop")
    args = parser.parse_args()
    uvicorn.run(build_app(args.llm, args.client), host="127.0.0.1", port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
