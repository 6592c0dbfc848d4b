"""OpenAI's request and response schema for completions and chat completions (the subset llmc serves).

Requests are pydantic models validated in strict mode from the raw JSON body, so a string where a
number belongs, an out-of-range value or a batch of prompts is a 400 with OpenAI's error object,
never a silent coercion. Fields OpenAI defines but llmc cannot honour (penalties, logit_bias,
echo, best_of, n > 1) are typed too, and rejected only when they ask for something other than
the default, so stock clients that send them with default values keep working. Unknown fields
are ignored, as OpenAI-compatible servers do.

Responses are plain dicts built here: one place knows the wire format of a completion, a chat
completion, their stream chunks, usage and logprobs.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmc.errors import LlmcError
from llmc.runtime.sampling import SamplingParams

MAX_TOP_LOGPROBS = SamplingParams.MAX_LOGPROBS  # 20, OpenAI's limit too


class BadRequest(LlmcError):
    """A request the server refuses with 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Sampling fields shared by /v1/completions and /v1/chat/completions (with llmc's extensions)."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0  # vLLM's extension; -1 and 0 both mean off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens tokens
    user: str | None = None
    # Defined by OpenAI, unsupported here: accepted only at their defaults.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None


UNSUPPORTED_DEFAULTS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "echo": False,
                        "suffix": None}


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


def parse_request(model: type[_Common], body: bytes) -> _Common:
    """Validate a JSON body; every problem becomes one BadRequest naming the field."""
    try:
        req = model.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] in ("json_invalid", "json_type"):
            raise BadRequest(f"request body is not valid JSON: {err['msg']}") from None
        # loc is the field path, with union members' tags (str, list[int]...) interleaved: name the field.
        param = str(err["loc"][0]) if err["loc"] else None
        where = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or p in req_fields(model)) or param
        raise BadRequest(f"{where}: {err['msg']}" if where else err["msg"], param) from None
    if req.n != 1:
        raise BadRequest("only n=1 is supported", "n")
    if req.best_of not in (None, 1):
        raise BadRequest("only best_of=1 is supported", "best_of")
    for name, default in UNSUPPORTED_DEFAULTS.items():
        value = getattr(req, name, default)
        if value != default and (default is not None or value):  # logit_bias={} is the default too
            raise BadRequest(f"{name} is not supported by this server", name)
    if req.stop == "" or isinstance(req.stop, list) and not all(req.stop):
        raise BadRequest("stop strings must be non-empty", "stop")
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs requires logprobs=true", "top_logprobs")
    return req


def req_fields(model: type[BaseModel]) -> set[str]:
    """Every field name of a request model and of the models nested in it (for error paths)."""
    names = set(model.model_fields)
    for sub in (ChatMessage, TextPart, StreamOptions):
        names |= set(sub.model_fields)
    return names


def single_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text or token ids (a batch of several is refused)."""
    p = req.prompt
    if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
        return p
    if isinstance(p, list) and len(p) == 1:
        return p[0]
    if not p:
        return ""
    raise BadRequest("only one prompt per request is supported (send several requests instead)", "prompt")


def sampling_kwargs(req: _Common, context_len: int) -> dict[str, Any]:
    """SamplingParams keyword arguments of a request (its max_tokens, logprobs resolved).

    Without max_tokens a chat request may use the rest of the context, as OpenAI's does (the
    runtime caps prompt + output at max_seq_len and finishes with "length").
    """
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens, logprobs = req.max_tokens, req.logprobs
    kw: dict[str, Any] = dict(temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
                              seed=req.seed, stop=req.stop or [], ignore_eos=req.ignore_eos, logprobs=logprobs)
    kw["max_tokens"] = max_tokens if max_tokens is not None else context_len
    return kw


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- responses -------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_logprobs(entries: list[dict], token_text, offset: int) -> dict[str, list]:
    """OpenAI's legacy completions logprobs: parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text = token_text(e["token_id"])
        out["tokens"].append(text)
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({token_text(t): lp for t, lp in e.get("top") or []})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(entries: list[dict], token_text) -> dict[str, list]:
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    def item(tid: int, lp: float) -> dict[str, Any]:
        text = token_text(tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e["token_id"], e["logprob"]),
                         "top_logprobs": [item(t, lp) for t, lp in e.get("top") or []]} for e in entries]}


class ResponseShape:
    """The wire format of one endpoint: a full response, a stream chunk, the usage-only chunk."""

    def __init__(self, chat: bool, rid: str, model: str):
        self.chat, self.id, self.model, self.created = chat, rid, model, int(time.time())

    def _envelope(self, obj: str, choices: list, usage_: dict | None, with_usage: bool) -> dict[str, Any]:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if with_usage:
            body["usage"] = usage_
        return body

    def full(self, text: str, finish_reason: str | None, logprobs: dict | None, usage_: dict) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice], usage_, True)
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], usage_, True)

    def chunk(self, text: str, finish_reason: str | None, logprobs: dict | None, include_usage: bool,
              first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
                {"content": text} if text or finish_reason is None else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice], None, include_usage)
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], None, include_usage)

    def usage_chunk(self, usage_: dict) -> dict[str, Any]:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage_, True)
