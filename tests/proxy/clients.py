#!/usr/bin/env python3
"""Calls stand-in services the way their users' real clients do, through the demand proxy.

Each URL given runs one check, with the official package no one here wrote:
  --ollama-url  ollama.Client(host=URL).chat(model=..., stream=True)
  --openai-url  openai.OpenAI(base_url=URL/v1).chat.completions.create(..., stream=True)
  --ws-url      websockets.sync.client.connect(URL): three messages, three echoes

The chat checks expect gpu-standin's answer (crates/sim-gpu/src/bin/gpu-standin): --tokens
tokens "tok1 ", "tok2 ", ..., one every --token-ms. They assert that the chunks arrive one by
one, as the stand-in writes them, not all at the end: a proxy that buffers a stream fails.

Prints one line per check passed; on any failure says which check and why, and exits 1.
"""

import argparse
import sys
import time

# How long any one call may take before the check fails instead of hanging the test.
TIMEOUT_S = 60.0


class CheckFailed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


def expected_content(tokens):
    return "".join(f"tok{n} " for n in range(1, tokens + 1))


def twice(name, call, args):
    """Streams two answers; checks the content of both, the timing of the second.

    A client's first call in a process is slow to hand over its first chunk (lazy imports,
    its models' first validation: tens of ms on a busy machine), which would eat into the
    spread measured. The first call, the one that starts a stopped service through the
    proxy, still has to succeed whole.
    """
    for _ in range(2):
        arrivals = call()
    return check_spread(name, arrivals, args)


def check_spread(name, arrivals, args):
    """The content chunks came one by one: the first clearly before the last."""
    expect(
        len(arrivals) == args.tokens,
        f"{len(arrivals)} content chunks, expected {args.tokens} (one per token)",
    )
    spread_ms = (arrivals[-1] - arrivals[0]) * 1000
    least_ms = (args.tokens - 1) * args.token_ms * 0.5
    expect(
        spread_ms >= least_ms,
        f"the first and last chunks arrived {spread_ms:.0f} ms apart, less than {least_ms:.0f} ms:"
        " the stream was held back and came at once",
    )
    return f"{name}: {len(arrivals)} chunks over {spread_ms:.0f} ms"


def check_ollama(args):
    import ollama

    client = ollama.Client(host=args.ollama_url, timeout=TIMEOUT_S)
    messages = [{"role": "user", "content": "Say something."}]

    def call():
        arrivals, content, parts = [], [], []
        for part in client.chat(model=args.model, messages=messages, stream=True):
            parts.append(part)
            if part.message.content:
                arrivals.append(time.monotonic())
                content.append(part.message.content)
        expect(parts, "no chunk at all")
        last = parts[-1]
        expect(last.done is True, f"the last chunk is not done: {last!r}")
        expect(last.done_reason == "stop", f"done_reason {last.done_reason!r}, expected 'stop'")
        expect(all(part.done is False for part in parts[:-1]), "a chunk before the last is done")
        joined = "".join(content)
        expect(joined == expected_content(args.tokens), f"content {joined!r}")
        return arrivals

    return twice("ollama chat stream", call, args)


def check_openai(args):
    import openai

    client = openai.OpenAI(
        base_url=args.openai_url.rstrip("/") + "/v1",
        api_key="x",
        timeout=TIMEOUT_S,
        # A retry would hide a failed first call.
        max_retries=0,
    )

    def call():
        stream = client.chat.completions.create(
            model=args.model,
            messages=[{"role": "user", "content": "Say something."}],
            stream=True,
        )
        arrivals, content, chunks = [], [], []
        for chunk in stream:
            chunks.append(chunk)
            expect(chunk.object == "chat.completion.chunk", f"object {chunk.object!r}")
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None and delta.content:
                arrivals.append(time.monotonic())
                content.append(delta.content)
        expect(chunks, "no chunk at all")
        finish = chunks[-1].choices[0].finish_reason if chunks[-1].choices else None
        expect(finish == "stop", f"the last chunk's finish_reason is {finish!r}, not 'stop'")
        joined = "".join(content)
        expect(joined == expected_content(args.tokens), f"content {joined!r}")
        return arrivals

    return twice("openai chat stream", call, args)


def check_ws(args):
    from websockets.sync.client import connect

    sent = ["hello 1", b"\x00\x01binary 2\xff", "hello 3"]
    with connect(args.ws_url, open_timeout=TIMEOUT_S, close_timeout=TIMEOUT_S) as socket:
        for message in sent:
            socket.send(message)
            echo = socket.recv(timeout=TIMEOUT_S)
            expect(echo == message, f"sent {message!r}, got back {echo!r}")
    return f"websocket: {len(sent)} messages echoed (text and binary)"


CHECKS = [
    ("ollama_url", "ollama", check_ollama),
    ("openai_url", "openai", check_openai),
    ("ws_url", "websocket", check_ws),
]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ollama-url", help="http://HOST:PORT of an Ollama-like service")
    parser.add_argument("--openai-url", help="http://HOST:PORT of an OpenAI-like service")
    parser.add_argument("--ws-url", help="ws://HOST:PORT/ws of a WebSocket echo")
    parser.add_argument("--model", default="llama3", help="the model to chat with")
    parser.add_argument("--tokens", type=int, default=5, help="the stand-in's --tokens")
    parser.add_argument("--token-ms", type=int, default=50, help="the stand-in's --token-ms")
    args = parser.parse_args(argv)
    if not any(getattr(args, attribute) for attribute, _, _ in CHECKS):
        parser.error("give at least one of --ollama-url, --openai-url, --ws-url")
    if args.tokens < 2:
        parser.error("--tokens must be at least 2 for the chunks' timing to tell anything")
    return args


def main(argv):
    args = parse_args(argv)
    failed = []
    for attribute, name, check in CHECKS:
        if not getattr(args, attribute):
            continue
        try:
            print(f"ok {check(args)}", flush=True)
        except Exception as error:  # any failure of a check is reported, then the next runs
            print(f"FAIL {name}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            failed.append(name)
    if failed:
        print(f"clients.py: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
