"""The chat format the local model server uses: ChatML with tool calls, run inside the server process.

llama-cpp-python's own ``chatml-function-calling`` format HTML-escapes every message (quotes become
``&#34;``), drops ``tool`` messages (the model never sees a tool's result), cannot answer in text when
tools are offered (its follow-up grammar only allows a function name) and fails on
``tool_choice: "required"``. This one keeps its prompt layout (``functions.<name>:`` then JSON arguments
constrained by the tool's JSON schema) and fixes those. ``python -m control.localmodel.chatformat ARGS``
registers it as ``caravan-chatml-tools`` and runs ``llama_cpp.server`` with ARGS.

A streamed answer ends with its token usage, counted as the server counts an answer it does not stream (it counts
none in a stream), and a request that fails while streaming ends its stream with an error event (the server's
error, with its HTTP status as ``status``) where the stream would otherwise end empty: the proxy asks for every
answer streamed, so that an answer whose client has gone can be stopped.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

__all__ = ["CHAT_FORMAT", "chatml_tools", "main", "render_prompt"]

CHAT_FORMAT = "caravan-chatml-tools"
_END = "<|im_end|>"
_SAMPLING = (
    "temperature", "top_p", "top_k", "min_p", "typical_p", "seed", "presence_penalty", "frequency_penalty",
    "repeat_penalty", "tfs_z", "mirostat_mode", "mirostat_tau", "mirostat_eta", "logits_processor", "logit_bias",
)  # fmt: skip


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def _tool_instructions(tools: list[dict[str, Any]]) -> str:
    listed = "".join(
        f"\nfunctions.{t['function']['name']}:\n"
        f"{t['function'].get('description', '')}\n{json.dumps(t['function'].get('parameters') or {})}\n"
        for t in tools
    )
    return (
        "\n\nYou have access to the following functions:\n" + listed + "\n\nYou can respond to users messages "
        "with either a single message or a function call.\n\nTo respond with a message begin the message with "
        "'message:', use the following format:\n\nmessage:\n<message>\n\nTo respond with a function call begin "
        "the message with 'functions.<function_name>:', use the following format:\n\n"
        'functions.<function_name>:\n{ "arg1": "value1", "arg2": "value2" }'
    )


def render_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """The ChatML prompt; with ``tools``, the system message lists them and answers are prefixed as above."""
    out: list[str] = []
    names: dict[str, str] = {}
    has_system = any(m.get("role") == "system" for m in messages)
    if tools and not has_system:
        out.append(f"<|im_start|>system\n{_tool_instructions(tools).strip()}{_END}\n")
    for m in messages:
        role, text = m.get("role"), _text(m.get("content"))
        if role == "system":
            out.append(f"<|im_start|>system\n{text}{_tool_instructions(tools) if tools else ''}{_END}\n")
        elif role == "assistant":
            parts = [f"message:\n{text}" if tools and text else text] if text else []
            for call in m.get("tool_calls") or []:
                names[call.get("id", "")] = call["function"]["name"]
                parts.append(f"functions.{call['function']['name']}:\n{call['function'].get('arguments', '')}")
            out.append(f"<|im_start|>assistant\n{chr(10).join(parts)}{_END}\n")
        elif role == "tool":
            name = names.get(m.get("tool_call_id", ""), "the function")
            out.append(f"<|im_start|>user\nfunctions.{name} returned:\n{text}{_END}\n")
        else:
            out.append(f"<|im_start|>{role or 'user'}\n{text}{_END}\n")
    return "".join(out) + "<|im_start|>assistant\n"


def chatml_tools(
    llama: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = None,
    stream: bool = False,
    stop: str | list[str] | None = None,
    max_tokens: int | None = None,
    response_format: dict[str, Any] | None = None,
    grammar: Any = None,
    **kwargs: Any,
) -> Any:
    """A ``LlamaChatCompletionHandler``: one text answer or one tool call per request."""
    args = (llama, messages, tools, tool_choice, stop, max_tokens, response_format, grammar)
    if stream:
        return _streamed(llama, lambda: _answer(*args, stream=True, **kwargs), messages, max_tokens)
    return _answer(*args, stream=False, **kwargs)


def _answer(
    llama: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    stop: str | list[str] | None,
    max_tokens: int | None,
    response_format: dict[str, Any] | None,
    grammar: Any,
    stream: bool,
    **kwargs: Any,
) -> Any:
    from llama_cpp import llama_chat_format as fmt
    from llama_cpp import llama_grammar

    sampling = {k: kwargs[k] for k in _SAMPLING if kwargs.get(k) is not None}
    named = {"model": kwargs["model"]} if kwargs.get("model") else {}  # the name answers carry (else the file's path)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stops.append(_END)
    offered = list(tools or []) if tool_choice != "none" else []
    prompt = render_prompt(messages, offered)

    def complete(text: str, **extra: Any) -> Any:
        args = {"stream": stream, "stop": stops, "max_tokens": max_tokens, **sampling, **named, **extra}
        return llama.create_completion(prompt=text, **args)

    def call(name: str) -> Any:
        tool = next((t for t in offered if t["function"]["name"] == name), None)
        if tool is None:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        schema = json.dumps(tool["function"].get("parameters") or {"type": "object"})
        constrained = llama_grammar.LlamaGrammar.from_json_schema(schema, verbose=False)
        completion = complete(f"{prompt}functions.{name}:\n", grammar=constrained)
        return _tool_call_stream(name, completion) if stream else _tool_call(name, completion)

    if not offered:
        if response_format is not None and response_format.get("type") == "json_object":
            grammar = fmt._grammar_for_response_format(response_format)  # type: ignore[arg-type]
        return fmt._convert_completion_to_chat(complete(prompt, grammar=grammar), stream=stream)
    if isinstance(tool_choice, dict):
        return call(tool_choice["function"]["name"])
    choices = [f'"functions.{t["function"]["name"]}:"' for t in offered]
    if tool_choice != "required":
        choices.append('"message:"')
    decide = llama_grammar.LlamaGrammar.from_string(f"root ::= {' | '.join(choices)}", verbose=False)
    first = llama.create_completion(prompt=prompt, temperature=0, max_tokens=24, stop=[":"], grammar=decide, **named)
    decided = first["choices"][0]["text"].strip()
    if decided.startswith("functions."):
        return call(decided[len("functions.") :])
    return fmt._convert_completion_to_chat(complete(f"{prompt}message:\n", grammar=grammar), stream=stream)


def _streamed(
    llama: Any, answer: Callable[[], Iterator[dict[str, Any]]], messages: list[dict[str, Any]], max_tokens: int | None
) -> Iterator[dict[str, Any]]:
    """The chunks of ``answer()`` (called at the first chunk asked for), then one of its usage; or an error event."""
    try:
        chunks = answer()
        head: dict[str, Any] = {}
        with _counting(llama) as count:
            for chunk in chunks:
                head = head or chunk
                yield chunk
        named = {k: head.get(k) for k in ("id", "created", "model")}
        yield {**named, "object": "chat.completion.chunk", "choices": [], "usage": count.usage(llama)}
    except Exception as exc:  # the server's own handler for an answer not streamed: the same status and message
        yield _error_event(exc, messages, max_tokens)


@dataclass
class _Count:
    prompt: int = 0
    sampled: list[int] = field(default_factory=list)

    def usage(self, llama: Any) -> dict[str, int]:
        from llama_cpp import llama_cpp as lib

        ended = bool(self.sampled) and lib.llama_vocab_is_eog(llama._model.vocab, self.sampled[-1])
        completion = len(self.sampled) - ended
        return {"prompt_tokens": self.prompt, "completion_tokens": completion, "total_tokens": self.prompt + completion}


@contextlib.contextmanager
def _counting(llama: Any) -> Iterator[_Count]:
    """Counts the tokens of the completion made inside as ``Llama._create_completion`` does for its ``usage``: the
    prompt's are those it gives ``Llama.generate``, the answer's those generated but a last end-of-generation one."""
    count = _Count()
    generate = type(llama).generate.__get__(llama)

    def counted(tokens: list[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        count.prompt = len(tokens)
        for token in generate(tokens, *args, **kwargs):  # the completion only iterates: it sends nothing in
            count.sampled.append(token)
            yield token

    llama.generate = counted  # the server runs one completion at a time (its lock)
    try:
        yield count
    finally:
        vars(llama).pop("generate", None)


def _error_event(exc: Exception, messages: list[dict[str, Any]], max_tokens: int | None) -> dict[str, Any]:
    from llama_cpp.server.errors import RouteErrorHandler

    request = SimpleNamespace(messages=messages, max_tokens=max_tokens)  # all its formatters read
    for pattern, formatter in RouteErrorHandler.pattern_and_formatters.items():
        if (match := pattern.search(str(exc))) is not None:
            status, error = formatter(request, match)  # type: ignore[arg-type]
            return {"error": error, "status": status}
    print(f"Exception: {exc}", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    error = {"message": str(exc), "type": "internal_server_error", "param": None, "code": None}
    return {"error": error, "status": 500}


def _tool_call(name: str, completion: dict[str, Any]) -> dict[str, Any]:
    """One tool call as a chat completion (llama-cpp-python's helper adds the legacy ``function_call``, which
    OpenAI clients refuse)."""
    arguments = completion["choices"][0]["text"]
    call = {"id": f"call_{completion['id']}", "type": "function", "function": {"name": name, "arguments": arguments}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return {
        "id": f"chat{completion['id']}",
        "object": "chat.completion",
        "created": completion["created"],
        "model": completion["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls", "logprobs": None}],
        "usage": completion["usage"],
    }


def _tool_call_stream(name: str, chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One tool call as OpenAI streams it: the name once, then pieces of the arguments, then the finish."""
    head: dict[str, Any] | None = None
    for chunk in chunks:
        if head is None:
            head = {"id": f"chat{chunk['id']}", "object": "chat.completion.chunk"}
            head.update(created=chunk["created"], model=chunk["model"])
            call = {"index": 0, "id": f"call_{chunk['id']}", "type": "function"}
            call["function"] = {"name": name, "arguments": ""}
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [call]}}]}
        piece = {"index": 0, "function": {"arguments": chunk["choices"][0]["text"]}}
        yield {**head, "choices": [{"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}]}
    if head is not None:
        yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}


def main() -> None:
    import sys

    from llama_cpp import llama_chat_format
    from llama_cpp.server.__main__ import main as serve

    llama_chat_format.register_chat_completion_handler(CHAT_FORMAT)(chatml_tools)
    sys.argv[0] = "llama_cpp.server"
    serve()


if __name__ == "__main__":
    main()
