"""OpenAI-compatible sampling, as Tinker serves it (beta) at ``/oai/api/v1``: ``/completions``,
``/chat/completions`` and ``/models``, for evaluation harnesses and OpenAI clients::

    openai.OpenAI(base_url="http://127.0.0.1:8000/oai/api/v1", api_key="tml-...")

``model`` is a ``tinker://`` checkpoint of the caller's (its adapter is used, not the base model) or a
base model this server serves. Sampling stops at the model's EOS tokens and at ``stop`` strings, which
are cut from the text; chat prompts are rendered with the tokenizer's chat template. Requests run on the
same samplers as the Tinker routes (batched with concurrent requests). With ``stream: true`` the text
comes as server-sent events, one chunk per choice every ``stop_check_interval`` decode steps (text that a
stop string or a partial character may still change is held back); a reader that goes away ends its
samples. Errors come back in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, naming
the field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jtinker.sampling import SampleRequest, TextStream, first_stop
from jtinker.server.wire import UserError

OAI = "/oai/api/v1"
MAX_N = 128
MAX_STOP = 16
MAX_LOGPROBS = 20
DEFAULT_CHAT_MAX_TOKENS = 4096
_COMMON_FIELDS = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "logit_bias"}
    | {"stream", "stream_options"}
    | {"presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"}  # the last two: vLLM's
)
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "best_of", "echo"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format"}
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


# The sampler's field names, as the OpenAI request calls them.
_SAMPLER_FIELDS = {
    "stop_strings": "stop",
    "stop_token_ids": "stop",
    "num_samples": "n",
    "topk_sample_logprobs": "logprobs",
}


class _Invalid(UserError):
    def __init__(self, param: str, message: str, status: int = 400):
        super().__init__(f"{param}: {message}", status)
        self.param = param


def _error(exc: UserError) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status, "invalid_request_error")
    body = {"message": str(exc), "type": kind, "param": getattr(exc, "param", None), "code": None}
    return JSONResponse({"error": body}, status_code=exc.status)


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not (lo <= value <= hi) or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise _Invalid(key, f"must be {kind} in [{lo}, {hi}], got {value!r}")
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) and s for s in stops)
        or len(stops) > MAX_STOP
    ):
        raise _Invalid("stop", f"must be a non-empty string or a list of at most {MAX_STOP}, got {stop!r}")
    return tuple(stops)


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's ``{"token id": bias}``; the sampler checks the ids' range and the biases."""
    bias = body.get("logit_bias")
    if bias is None or bias == {}:
        return None
    if not isinstance(bias, dict) or not all(isinstance(k, str) and k.isdigit() for k in bias):
        raise _Invalid("logit_bias", f'must map token ids ("50256") to biases, got {bias!r:.80}')
    return {int(token): value for token, value in bias.items()}


def _stream_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _Invalid("stream_options", "needs stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise _Invalid("stream_options", f"only include_usage is supported by jtinker, got {options!r:.80}")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise _Invalid("stream_options", f"include_usage must be a boolean, got {usage!r}")
    return usage


def _check_common(body: Any, known: frozenset[str]) -> dict:
    if not isinstance(body, dict):
        raise _Invalid("body", "expected a JSON object")
    unknown = sorted(set(body) - known - _IGNORED)
    if unknown:
        raise _Invalid(unknown[0], "is not supported by jtinker")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _Invalid("model", "required: a tinker:// checkpoint path or a base model name")
    return body


@dataclasses.dataclass(frozen=True)
class _Sampling:
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: dict[int, float] | None
    stops: tuple[str, ...]
    top_logprobs: int  # 0: none
    stream: bool
    stream_usage: bool  # stream_options.include_usage: a last chunk with the usage

    @classmethod
    def parse(cls, body: dict, max_tokens: int, top_logprobs: int) -> _Sampling:
        if body.get("best_of") not in (None, body.get("n", 1)):
            raise _Invalid("best_of", "is not supported by jtinker (only equal to n)")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise _Invalid("seed", f"must be an integer, got {seed!r}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _Invalid("stream", f"must be a boolean, got {stream!r}")
        if stream and body.get("logprobs") is not None and body["logprobs"] is not False:  # 0 asks too
            raise _Invalid("logprobs", "is not supported with stream by jtinker")
        return cls(
            n=_number(body, "n", 1, 1, MAX_N, integer=True),
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,  # 0: greedy in effect
            seed=seed,
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 100.0),
            logit_bias=_logit_bias(body),
            stops=_stops(body),
            top_logprobs=top_logprobs,
            stream=stream,
            stream_usage=_stream_usage(body, stream),
        )


class OpenAIRoutes:
    """The routes, over :class:`jtinker.server.app.Api`'s authorization and body parsing."""

    def __init__(self, api: Any):
        self.api = api

    def routes(self) -> list[tuple[str, Callable, tuple[str, ...]]]:
        return [
            (f"{OAI}/models", self.models, ("GET",)),
            (f"{OAI}/completions", self.completions, ("POST",)),
            (f"{OAI}/chat/completions", self.chat_completions, ("POST",)),
        ]

    async def _client(self, owner: str, model: str) -> Any:
        try:
            return await self.api.runtime.model_sampler(owner, model)
        except UserError as e:  # e.g. "base_model: 'x' is not served here; ..."
            raise _Invalid("model", str(e).split(": ", 1)[-1], e.status) from None

    async def models(self, request: Request) -> JSONResponse:
        """The served base models, then the caller's sampler checkpoints (newest first)."""
        try:
            owner = self.api.authorize(request, tinker_sdk=False)
        except UserError as e:
            return _error(e)
        names = self.api.runtime.supported_models()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "jtinker"} for name in names]
        runs, _ = self.api.runtime.db.runs_of(owner)
        checkpoints = [c for run in runs for c in await self.api.checkpoints(run["run_id"])]
        checkpoints.sort(key=lambda c: c.time, reverse=True)
        data += [
            {"id": c.tinker_path, "object": "model", "created": int(c.time.timestamp()), "owned_by": "you"}
            for c in checkpoints
            if c.checkpoint_type == "sampler"
        ]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response:
        try:
            owner = self.api.authorize(request, tinker_sdk=False)
            body = _check_common(await self.api.json(request), _COMPLETION_FIELDS)
            echo = body.get("echo", False)
            if not isinstance(echo, bool):
                raise _Invalid("echo", f"must be a boolean, got {echo!r}")
            logprobs = _number(body, "logprobs", 0, 0, MAX_LOGPROBS, integer=True)
            # max_tokens=0 with echo scores the prompt alone (what lm-eval's loglikelihood asks for).
            max_tokens = _number(body, "max_tokens", 16, 0 if echo else 1, 1 << 20, integer=True)
            sampling = _Sampling.parse(body, max_tokens, logprobs)
            if sampling.stream and echo:
                raise _Invalid("echo", "is not supported with stream by jtinker")
            client = await self._client(owner, body["model"])
            tokenizer = client.get_tokenizer()
            prompts = _completion_prompts(body.get("prompt"), tokenizer)
            if sampling.stream:
                return await self._stream(client, prompts, sampling, body["model"], chat=False)
            want_lp = body.get("logprobs") is not None
            outs = await asyncio.gather(
                *(self._sample(client, p, sampling, echo=echo and want_lp) for p in prompts)
            )
        except UserError as e:
            return _error(e)
        choices = []
        for prompt_index, (prompt, (sequences, scored)) in enumerate(zip(prompts, outs, strict=True)):
            for j, seq in enumerate(sequences):
                text, reason = _text(tokenizer, seq, sampling.stops)
                tokens, lps, _, top = seq
                if echo:
                    text = tokenizer.decode(prompt, skip_special_tokens=True) + text
                    if scored is not None:
                        tokens, lps, top = prompt + tokens, scored[0] + lps, _join(scored[1], top)
                lp = _completion_logprobs(tokenizer, tokens, lps, top) if want_lp else None
                index = prompt_index * sampling.n + j
                choices.append({"index": index, "text": text, "finish_reason": reason, "logprobs": lp})
        every = [sequences for sequences, _ in outs]
        return JSONResponse(_envelope("text_completion", "cmpl", body["model"], choices, prompts, every))

    async def chat_completions(self, request: Request) -> Response:
        try:
            owner = self.api.authorize(request, tinker_sdk=False)
            body = _check_common(await self.api.json(request), _CHAT_FIELDS)
            if body.get("response_format") not in (None, {"type": "text"}):
                raise _Invalid("response_format", "only {'type': 'text'} is supported by jtinker")
            want_logprobs = body.get("logprobs")
            if want_logprobs not in (None, True, False):
                raise _Invalid("logprobs", f"must be a boolean, got {want_logprobs!r}")
            top = _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
            if top and not want_logprobs:
                raise _Invalid("top_logprobs", "needs logprobs: true")
            max_tokens = _number(body, "max_completion_tokens", None, 1, 1 << 20, integer=True)
            if max_tokens is None:
                max_tokens = _number(body, "max_tokens", None, 1, 1 << 20, integer=True)
            client = await self._client(owner, body["model"])
            tokenizer = client.get_tokenizer()
            prompt = _chat_prompt(body.get("messages"), tokenizer, body["model"])
            if max_tokens is None:  # up to the context, as OpenAI's, within a cache a server can afford
                room = client.model_config.max_position_embeddings - len(prompt)
                max_tokens = max(1, min(room, DEFAULT_CHAT_MAX_TOKENS))
            sampling = _Sampling.parse(body, max_tokens, top)
            if sampling.stream:
                return await self._stream(client, [prompt], sampling, body["model"], chat=True)
            sequences, _ = await self._sample(client, prompt, sampling)
        except UserError as e:
            return _error(e)
        choices = []
        for j, seq in enumerate(sequences):
            text, reason = _text(tokenizer, seq, sampling.stops)
            message = {"role": "assistant", "content": text}
            lp = {"content": _chat_logprobs(tokenizer, seq)} if want_logprobs else None
            choices.append({"index": j, "message": message, "finish_reason": reason, "logprobs": lp})
        return JSONResponse(
            _envelope("chat.completion", "chatcmpl", body["model"], choices, [prompt], [sequences])
        )

    @staticmethod
    def _request(client: Any, prompt: list[int], sampling: _Sampling, *, echo: bool = False, on_tokens=None):
        return SampleRequest(
            prompt=prompt,
            num_samples=sampling.n,
            max_tokens=max(sampling.max_tokens, 1),  # 0: the prompt is scored, its one token dropped
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            min_p=sampling.min_p,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            logit_bias=sampling.logit_bias,
            stop_token_ids=client.model_config.eos_token_ids,
            stop_strings=sampling.stops,
            topk_sample_logprobs=sampling.top_logprobs,
            include_prompt_logprobs=echo,
            topk_prompt_logprobs=sampling.top_logprobs if echo else 0,
            on_tokens=on_tokens,
        )

    async def _sample(
        self, client: Any, prompt: list[int], sampling: _Sampling, *, echo: bool = False
    ) -> tuple:
        """One prompt's ``n`` sequences ``(tokens, logprobs, reason, top-k pairs per token or None)``
        and, with ``echo``, the prompt's ``(logprobs, top-k pairs)`` (its first token has none)."""
        future = client.submit_request(self._request(client, prompt, sampling, echo=echo))
        result = await _sampled(asyncio.wrap_future(future))
        scored = (result.prompt_logprobs, result.topk_prompt_logprobs) if echo else None
        return _sequences(result, sampling), scored

    async def _stream(
        self, client: Any, prompts: list[list[int]], sampling: _Sampling, model: str, *, chat: bool
    ) -> Response:
        """Samples ``prompts`` as server-sent events. A request the sampler refuses before its first
        tokens is answered with the usual JSON error instead."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()  # the reader went away: the sampler ends the samples

        def watch(p: int) -> Callable:
            def on_tokens(sample: int, tokens: list[int]) -> bool:
                loop.call_soon_threadsafe(updates.put_nowait, (p, sample, tokens))
                return not gone.is_set()

            return on_tokens

        futures = [
            asyncio.wrap_future(
                client.submit_request(self._request(client, prompt, sampling, on_tokens=watch(p)))
            )
            for p, prompt in enumerate(prompts)
        ]
        update = asyncio.ensure_future(updates.get())
        await asyncio.wait([update, *futures], return_when=asyncio.FIRST_COMPLETED)
        for future in futures:
            if future.done() and future.exception() is not None:
                gone.set()
                update.cancel()
                await _sampled(future)  # raises the refusal, named

        tokenizer = client.get_tokenizer()
        n = sampling.n
        deltas = [[TextStream(tokenizer, sampling.stops) for _ in range(n)] for _ in prompts]
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

        def event(choices: list[dict], **extra: Any) -> str:
            usage = {"usage": None} if sampling.stream_usage else {}
            return f"data: {json.dumps({**head, 'choices': choices, **usage, **extra})}\n\n"

        def choice(index: int, text: str, reason: str | None) -> dict:
            if chat:
                delta = {"content": text} if text else {}
                return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

        async def events():
            nonlocal update
            outs: list = [None] * len(prompts)
            try:
                if chat:  # the role first, as OpenAI's
                    yield event(
                        [
                            {"index": i, "delta": {"role": "assistant", "content": ""}}
                            for i in range(len(prompts) * n)
                        ]
                    )
                while None in outs:
                    pending = [f for f, out in zip(futures, outs, strict=True) if out is None]
                    await asyncio.wait([update, *pending], return_when=asyncio.FIRST_COMPLETED)
                    news = []
                    if update.done():
                        news.append(update.result())
                        update = asyncio.ensure_future(updates.get())
                    while not updates.empty():
                        news.append(updates.get_nowait())
                    for p, j, tokens in news:
                        text = deltas[p][j].piece(tokens) if outs[p] is None else ""
                        if text:
                            yield event([choice(p * n + j, text, None)])
                    for p, future in enumerate(futures):
                        if outs[p] is None and future.done():
                            outs[p] = _sequences(await _sampled(future), sampling)
                            for j, seq in enumerate(outs[p]):
                                text, reason = _text(tokenizer, seq, sampling.stops)
                                yield event([choice(p * n + j, deltas[p][j].end(text), reason)])
                if sampling.stream_usage:
                    yield event([], usage=_usage(prompts, outs))
                yield "data: [DONE]\n\n"
            except UserError as e:  # refused after the stream began (e.g. another prompt of the batch)
                yield f"data: {_error(e).body.decode()}\n\n"
            finally:
                gone.set()
                update.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")


async def _sampled(future: Any) -> Any:
    """The sampler's result; its refusals (``ValueError`` naming the field) as OpenAI's parameters."""
    try:
        return await future
    except ValueError as e:  # "max_tokens: prompt length ... exceeds ..."
        field, _, message = str(e).partition(": ")
        raise _Invalid(_SAMPLER_FIELDS.get(field, field), message) from None


def _sequences(result: Any, sampling: _Sampling) -> list[tuple]:
    tops = result.sequence_topk or [None] * len(result.sequences)
    return [
        (tokens, lps, reason, None if top is None else _pairs(*top))
        if sampling.max_tokens
        else ([], [], "length", None if top is None else [])
        for (tokens, lps, reason), top in zip(result.sequences, tops, strict=True)
    ]


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _completion_prompts(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str) or (_is_ids(prompt) and prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise _Invalid("prompt", "required: a string, a list of strings or a list of token ids")
    out = []
    for p in prompt:
        if not (isinstance(p, str) or _is_ids(p)):
            raise _Invalid("prompt", f"each prompt must be a string or a list of token ids, got {p!r:.80}")
        ids = tokenizer.encode(p) if isinstance(p, str) else p
        if not ids:
            raise _Invalid("prompt", "is empty after tokenization")
        out.append(list(ids))
    return out


def _chat_prompt(messages: Any, tokenizer: Any, model: str) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise _Invalid("messages", "required: a non-empty list of {role, content}")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise _Invalid(f"messages[{i}]", "expected {role: system|developer|user|assistant, content}")
        content = m.get("content")
        if isinstance(content, list):  # text parts only
            if not all(
                isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                for c in content
            ):
                raise _Invalid(f"messages[{i}].content", "only text parts are supported by jtinker")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise _Invalid(f"messages[{i}].content", f"expected a string, got {type(content).__name__}")
        plain.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise _Invalid("model", f"{model} has no chat template; use /completions")
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def _text(tokenizer: Any, seq: tuple, stops: Sequence[str]) -> tuple[str, str]:
    """The completion's text (special tokens and a stop string cut off) and its finish reason. Its
    logprobs cover every sampled token, the EOS or stop string's included."""
    tokens, _, reason, _ = seq
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = first_stop(text, stops)
    if cut is not None:
        text, reason = text[:cut], "stop"
    return text, "stop" if reason == "stop" else "length"


def _pairs(ids: Any, logprobs: Any) -> list[list[tuple[int, float]]]:
    """Top-k ``[T, k]`` arrays as (token, logprob) pairs per position."""
    return [list(zip(map(int, i), map(float, lp), strict=True)) for i, lp in zip(ids, logprobs, strict=True)]


def _join(prompt_top: list | None, top: list | None) -> list | None:
    return None if top is None and prompt_top is None else (prompt_top or []) + (top or [])


def _completion_logprobs(tokenizer: Any, tokens: list[int], logprobs: list, top: list | None) -> dict:
    """OpenAI's completion logprobs; ``top``: per token its top-k (token, logprob) pairs or None."""
    pieces = [tokenizer.decode([t]) for t in tokens]
    offsets = list(itertools.accumulate(map(len, pieces), initial=0))[:-1]
    top_rows = None
    if top is not None:  # keyed by text, as OpenAI's: of tokens that decode alike, the likeliest stays
        top_rows = []
        for pairs in top:
            row: dict[str, float] | None = None if pairs is None else {}
            for t, lp in pairs or ():
                row.setdefault(tokenizer.decode([t]), lp)
            top_rows.append(row)
    return {
        "tokens": pieces,
        "token_logprobs": [None if x is None else float(x) for x in logprobs],
        "top_logprobs": top_rows,
        "text_offset": offsets,
    }


def _chat_logprobs(tokenizer: Any, seq: tuple) -> list[dict]:
    tokens, logprobs, _, top = seq

    def entry(token_id: int, logprob: float) -> dict:
        piece = tokenizer.decode([token_id])
        return {"token": piece, "logprob": float(logprob), "bytes": list(piece.encode())}

    return [
        {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in (top[i] if top else ())]}
        for i, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True))
    ]


def _usage(prompts: list, outs: list) -> dict:
    completion_tokens = sum(len(seq[0]) for sequences in outs for seq in sequences)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(kind: str, prefix: str, model: str, choices: list, prompts: list, outs: list) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(prompts, outs),
    }
