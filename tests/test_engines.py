"""How an OpenAI-compatible stream becomes deltas (``staircase.live.engines.http_engine._StreamReader``), on
the event shapes vLLM's completions and chat APIs send; tests/test_live.py runs both
APIs against a real ``vllm serve``."""

from __future__ import annotations

from staircase.live.engines.http_engine import _StreamReader


def read(events):
    reader = _StreamReader()
    deltas = [d for d in (reader.delta(e) for e in events) if d is not None]
    return deltas, reader.finish


def usage(prompt, completion, cached=None):
    u = {"prompt_tokens": prompt, "completion_tokens": completion}
    if cached is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


def test_chat_stream_the_role_event_carries_the_usage():
    events = [{"choices": [{"delta": {"role": "assistant", "content": ""}}], "usage": usage(57, 0, 32)},
              {"choices": [{"delta": {"content": "Hel"}, "token_ids": [1]}], "usage": usage(57, 1, 32)},
              {"choices": [{"delta": {"content": "lo"}, "token_ids": [2, 3]}], "usage": usage(57, 3, 32)},
              {"choices": [{"delta": {"content": ""}, "finish_reason": "stop"}], "usage": usage(57, 3, 32)},
              {"choices": [], "usage": usage(57, 3, 32)}]
    deltas, finish = read(events)
    assert [(d.text, d.tokens) for d in deltas] == [("Hel", 1), ("lo", 2)]
    assert (deltas[0].prompt_tokens, deltas[0].cached_tokens) == (57, 32)
    assert deltas[1].prompt_tokens is None and finish == "stop"


def test_completions_stream_counts_tokens_without_token_ids():
    events = [{"choices": [{"text": "a b"}], "usage": usage(10, 2)},
              {"choices": [{"text": " c", "finish_reason": "length"}], "usage": usage(10, 3)}]
    deltas, finish = read(events)
    assert [d.tokens for d in deltas] == [2, 1] and deltas[0].prompt_tokens == 10
    assert deltas[0].cached_tokens == 0 and finish == "length"
    # no usage at all: one token per non-empty text
    deltas, _ = read([{"choices": [{"text": "x"}]}, {"choices": [{"text": ""}]}, {"choices": [{"text": "y"}]}])
    assert [d.tokens for d in deltas] == [1, 1] and deltas[0].prompt_tokens is None


def test_completions_stream_gives_cached_tokens_in_its_last_usage_only():
    """vLLM's completions server streams usage without ``prompt_tokens_details`` and puts
    the cached tokens in the final usage event alone: the reader keeps them for the
    stream's last delta (``late_cached``), which the runner reports to the driver."""
    events = [{"choices": [{"text": "a", "token_ids": [1]}], "usage": usage(200, 1)},
              {"choices": [{"text": " b", "token_ids": [2], "finish_reason": "stop"}], "usage": usage(200, 2)},
              {"choices": [], "usage": usage(200, 2, 160)}]
    reader = _StreamReader()
    deltas = [d for d in (reader.delta(e) for e in events) if d is not None]
    assert deltas[0].prompt_tokens == 200 and deltas[0].cached_tokens == 0
    assert reader.late_cached == 160 and reader.finish == "stop"
