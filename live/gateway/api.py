"""The OpenAI chat-completions wire format ``staircase serve`` speaks: request and
response models (they are the server's OpenAPI schema), the error shape, and how a
conversation becomes the MoA query.

What is accepted beyond OpenAI's fields: ``policy`` (a registered policy's name; with
the official client, ``extra_body={"policy": ...}``) and vLLM's ``ignore_eos``. Other
unknown fields are ignored, as vLLM's own server does.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_exceeded", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(description="the served model name, or a registered policy's name (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, description="cap on the answer's tokens (the final node's)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same; wins over max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="every call of the request samples with it")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1, description="one answer per request")
    ignore_eos: bool = Field(False, description="vLLM's: every call generates its whole budget (benchmarks)")
    policy: str | None = Field(None, description="staircase: a registered policy for this request "
                                                 "(default: the server's first)")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="the query's tokens, as the user sent them")
    completion_tokens: int
    total_tokens: int
    staircase: dict | None = Field(None, description="what the MoA cost: calls, prompt tokens over every call, "
                                                     "cached tokens, policy, inputs lost")


class AnswerMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AnswerMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "staircase"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "stopping"]
    requests_in_flight: int
    max_in_flight: int


def conversation_query(messages: list[ChatMessage]) -> str:
    """The MoA query of a conversation: a lone user message as it is; otherwise the
    turns as a transcript (``System: ...``, ``User: ...``, ``Assistant: ...``), which
    every proposer and the aggregator read as the user's query."""
    if len(messages) == 1 and messages[0].role == "user":
        text = messages[0].text()
    else:
        label = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
        text = "\n\n".join(f"{label[m.role]}: {m.text()}" for m in messages if m.text().strip())
    if not text.strip():
        raise ApiError(400, "messages: no text in any message; give at least one message with text", "messages")
    return text


def completion_id(request_id: int) -> str:
    return f"chatcmpl-staircase-{int(time.time() * 1000):x}-{request_id}"
