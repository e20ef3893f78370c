"""The OpenAI chat-completions wire format ``staircase serve`` speaks: request and
response models (they are the server's OpenAPI schema), the error shape, and how a
conversation becomes the MoA query.

What is accepted beyond OpenAI's fields: ``policy`` (a registered policy's name; with
the official client, ``extra_body={"policy": ...}``) and vLLM's ``ignore_eos``. Fields
the gateway cannot honour (``UNHONOURED``: tools, structured output, log probabilities,
more than one answer) are refused with a 400 naming them rather than ignored; other
unknown fields are ignored, as vLLM's own server does. ``stop`` ends the answer the
client gets at the first stop string (the string itself left out, finish reason
``stop``); the run behind it goes on to its end (its row keeps the whole answer).
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
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the answer ends before the first")
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


# fields the gateway cannot honour -> the values that ask for nothing (absent, or one of these, is fine)
UNHONOURED = {"tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
              "response_format": ({"type": "text"},), "logprobs": (False,), "top_logprobs": (0,),
              "logit_bias": ({},), "audio": (), "modalities": (["text"],), "prediction": ()}


def check_honoured(body: ChatCompletionRequest) -> None:
    """A 400 naming the first field the gateway cannot honour (``UNHONOURED``)."""
    extra = body.model_extra or {}
    for name, harmless in UNHONOURED.items():
        value = extra.get(name)
        if value is not None and value not in harmless:
            raise ApiError(400, f"{name}: not supported by staircase serve (an MoA answer is plain text from "
                                f"the aggregator); leave it out", name)
    stops = stop_strings(body)
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, f"stop: got {body.stop!r}; allowed: up to 4 non-empty strings", "stop")


def stop_strings(body: ChatCompletionRequest) -> tuple[str, ...]:
    return (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())


class StopScan:
    """Cuts a streamed answer at the first of ``stops``: ``feed`` returns the text safe to
    send (held back: what could still begin a stop string) and whether a stop was met;
    ``flush`` the rest when the answer ends without one."""

    __slots__ = ("stops", "held", "keep", "stopped")

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held, self.stopped = stops, "", False
        self.keep = max(map(len, stops)) - 1 if stops else 0

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        if self.stopped:
            return ""
        buf = self.held + text
        head, self.stopped = cut_at_stop(buf, self.stops)
        if self.stopped:
            self.held = ""
            return head
        safe = len(buf) - self.keep
        self.held = buf[max(safe, 0):]
        return buf[:max(safe, 0)]

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether there was one."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


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
