"""What the API's routes depend on, declared as FastAPI dependencies (``Annotated[..., Depends()]``).

The lifespan of :func:`api.create_app` opens these once per process and yields them as the
lifespan state (:func:`lifespan_state`); Starlette hands that state to every request as
``request.state``. A route declares what it needs by type (``settings: SettingsDep``), and any
router included in the app (the dashboard's, say) does the same by importing from here, not
from ``api`` (which includes those routers: importing ``api`` from them would be a cycle).
Tests substitute a piece with ``app.dependency_overrides[get_classifier] = ...``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from classifier import ConversationClassifier
from config import Settings
from llm_wrapper import OllamaClient


def lifespan_state(settings: Settings, classifier: ConversationClassifier, llm_client: OllamaClient) -> dict[str, Any]:
    """The lifespan state the dependencies below read: one place names its keys."""
    return {"settings": settings, "classifier": classifier, "llm_client": llm_client}


def get_settings(request: Request) -> Settings:
    return request.state.settings


def get_classifier(request: Request) -> ConversationClassifier:
    return request.state.classifier


def get_llm_client(request: Request) -> OllamaClient:
    return request.state.llm_client


SettingsDep = Annotated[Settings, Depends(get_settings)]
ClassifierDep = Annotated[ConversationClassifier, Depends(get_classifier)]
LLMClientDep = Annotated[OllamaClient, Depends(get_llm_client)]
