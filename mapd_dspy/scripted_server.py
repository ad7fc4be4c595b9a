"""A scripted, OpenAI-compatible chat server for benchmarks, tests and fault injection.

A fake, never the product: it answers every MAPD call after a fixed latency with a scripted reply
in the format the request asks for, so the real DSPy program and ``dspy.LM`` (its native engine or
LiteLLM) run over real HTTP while the "models" cost nothing. Standard library only.

API (other tests and tools rely on exactly this)::

    from mapd_dspy.scripted_server import ScriptedServer

    with ScriptedServer(latency_ms=200, faults=["429=0.1", "teacher-b:malformed=0.5"], seed=0, port=0) as server:
        lm = dspy.LM("openai/teacher-a", api_base=server.api_base, api_key="x")  # "http://127.0.0.1:PORT/v1"
        ...
        server.stats()          # the same dict GET /stats returns
        server.reset()          # the same as POST /reset

    python -m mapd_dspy.scripted_server --port P --latency-ms L --fault KIND=RATE [--fault MODEL:KIND=RATE] --seed S
        prints ``READY http://127.0.0.1:P/v1`` on stdout once it listens (P is the real port when
        --port 0); SIGTERM or Ctrl-C stops it. Other options: --host, --model NAME (repeatable),
        --hang-s, --model-latency MODEL=MS (repeatable), --student-answer, --rationale-answer, --score.
        Also ``ScriptedServer(..., models=[names], policy=callable, hang_s=30.0,
        model_latency_ms={"slow-model": 500})``.

Endpoints:

* ``GET /v1/models``: the configured names (default ``["student-r0"]``, plus every ``--model`` and
  every model named in a fault rule); ``GET /v1/models/NAME`` answers that any name exists.
* ``POST /v1/chat/completions``: recognises the MAPD signature from the output fields listed in the
  system prompt DSPy builds (``reasoning``+``answer``: ``solve``; ``explanation``: ``explain``;
  ``rationale``+``answer``: ``rationale``; ``critique``/``score``: ``review``; else ``unknown``)
  and answers as a DSPy ``JSONAdapter`` JSON object when the request has ``response_format`` or the
  prompt asks for JSON, else in DSPy ``ChatAdapter`` ``[[ ## field ## ]]`` format. ``usage`` counts
  tokens as ``len(text) // 4``.
* ``GET /stats``: JSON ``{"total", "by_kind", "by_model", "by_model_kind", "faults",
  "faults_by_model", "max_in_flight", "max_in_flight_by_model", "events"}``; ``events`` lists every
  chat request as ``{"model", "kind", "fault", "start", "end"}`` (seconds since the server started,
  ``end`` is None while in flight), in arrival order.
* ``POST /reset``: clears the stats and the fault draws.

The replies are scripted by a *policy*: a callable ``policy(request: ScriptedRequest) -> dict`` of
output-field values (fields it leaves out get the default). The default (:class:`DefaultPolicy`):
the student always answers ``student_answer`` (default ``"-1"``, wrong on every MAPD task), every
rationale answers ``rationale_answer`` (default ``"42"``), every review scores ``score`` (default 4).

Faults: rules ``KIND=RATE`` (every model) or ``MODEL:KIND=RATE`` (that model only; it overrides an
all-model rule of the same kind), given as a list of such strings or a dict ``{"KIND": rate,
"MODEL:KIND": rate}``. Kinds: ``429`` and ``500`` (an OpenAI-style error body), ``timeout`` (sleep
``hang_s``, longer than the client's timeout, then close the connection without answering),
``empty`` (empty content), ``malformed`` (prose in neither requested format), ``out_of_scale``
(reviews only: score 9; other kinds never draw it). A request's fault is drawn from a hash of
(seed, model, the request's messages, how many times this model already got these messages), so a
run is reproducible whatever the arrival order, and a retried request draws again. The fault
rates of one model partition [0, 1): at most one fault per request.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

FAULT_KINDS = ("429", "500", "timeout", "empty", "malformed", "out_of_scale")
SIGNATURE_KINDS = ("solve", "explain", "rationale", "review", "unknown")
OUT_OF_SCALE_SCORE = 9


# --------------------------------------------------------------------------------------------
# What a request asks for


@dataclass
class ScriptedRequest:
    """One chat request as the policy sees it."""

    model: str
    kind: str  # one of SIGNATURE_KINDS
    output_fields: dict[str, str]  # name -> type as DSPy wrote it ("str", "int", ...), in order
    inputs: dict[str, str]  # the [[ ## field ## ]] blocks of the last user message
    wants_json: bool


Policy = Callable[[ScriptedRequest], Mapping[str, Any]]


@dataclass
class DefaultPolicy:
    """A student that is always wrong, teachers whose rationales all answer the same, fixed scores."""

    student_answer: str = "-1"
    rationale_answer: str = "42"
    score: int = 4

    def __call__(self, request: ScriptedRequest) -> dict[str, Any]:
        question = request.inputs.get("question", "")[:60]
        if request.kind == "solve":
            return {"reasoning": f"Scripted student reasoning about: {question}", "answer": self.student_answer}
        if request.kind == "explain":
            return {"explanation": f"Scripted explanation: the student's step on '{question}' is wrong."}
        if request.kind == "rationale":
            steps = f"Scripted rationale. Step 1: read '{question}'. Step 2: compute. So the answer is {self.rationale_answer}."
            return {"rationale": steps, "answer": self.rationale_answer}
        if request.kind == "review":
            return {"critique": "Scripted critique: the steps follow.", "score": self.score}
        return {}


_OUTPUT_FIELD = re.compile(r"^\d+\. `(\w+)` \(([^)]*)\)", re.MULTILINE)
_INPUT_BLOCK = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond with|\Z)", re.DOTALL)


def _text_of(message: Mapping[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def output_fields_of(system_prompt: str) -> dict[str, str]:
    """The output fields DSPy lists under "Your output fields are:" in its system prompt."""
    _, found, rest = system_prompt.partition("Your output fields are:")
    if not found:
        return {}
    listing = rest.split("All interactions will be structured", 1)[0]
    return {name: type_name for name, type_name in _OUTPUT_FIELD.findall(listing)}


def signature_kind(output_fields: Iterable[str]) -> str:
    names = set(output_fields)
    if names & {"critique", "score"}:
        return "review"
    if "explanation" in names:
        return "explain"
    if "rationale" in names:
        return "rationale"
    if {"reasoning", "answer"} <= names:
        return "solve"
    return "unknown"


def parse_request(body: Mapping[str, Any]) -> ScriptedRequest:
    messages = body.get("messages") or []
    system = "\n".join(_text_of(m) for m in messages if m.get("role") == "system")
    users = [_text_of(m) for m in messages if m.get("role") == "user"]
    last_user = users[-1] if users else ""
    fields = output_fields_of(system)
    wants_json = bool(body.get("response_format")) or "JSON object" in last_user or "JSON object" in system
    inputs = {name: value.strip() for name, value in _INPUT_BLOCK.findall(last_user)}
    return ScriptedRequest(str(body.get("model", "")), signature_kind(fields), fields, inputs, wants_json)


# --------------------------------------------------------------------------------------------
# Writing the reply


def _filled_values(request: ScriptedRequest, policy: Policy, fault: str | None) -> dict[str, Any]:
    values = dict(DefaultPolicy()(request))
    values.update(policy(request) or {})
    if fault == "out_of_scale" and request.kind == "review":
        values["score"] = OUT_OF_SCALE_SCORE
    for name, type_name in request.output_fields.items():
        values.setdefault(name, 0 if type_name == "int" else f"scripted {name}")
    return {name: values[name] for name in request.output_fields} or values


def render_reply(request: ScriptedRequest, policy: Policy, fault: str | None) -> str:
    """The assistant's text: JSON object or ChatAdapter fields, or a broken reply for a fault."""
    if fault == "empty":
        return ""
    if fault == "malformed":
        return "Well, I think it is probably something like that, but I am not sure. (scripted malformed reply)"
    values = _filled_values(request, policy, fault)
    if request.wants_json:
        return json.dumps(values, ensure_ascii=False)
    blocks = [f"[[ ## {name} ## ]]\n{value}" for name, value in values.items()]
    return "\n\n".join([*blocks, "[[ ## completed ## ]]"])


def completion_body(model: str, texts: list[str], prompt_chars: int, number: int) -> dict[str, Any]:
    completion_tokens = sum(len(text) // 4 for text in texts)
    prompt_tokens = prompt_chars // 4
    return {
        "id": f"chatcmpl-scripted-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            for i, text in enumerate(texts)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# --------------------------------------------------------------------------------------------
# Faults


def parse_fault_rules(faults: Iterable[str] | Mapping[str, float] | None) -> dict[tuple[str, str], float]:
    """``{(model or "*", kind): rate}`` from ``["KIND=RATE", "MODEL:KIND=RATE"]`` or a dict."""
    if faults is None:
        return {}
    pairs = faults.items() if isinstance(faults, Mapping) else (_split_rule(rule) for rule in faults)
    rules: dict[tuple[str, str], float] = {}
    for target, rate in pairs:
        model, _, kind = str(target).rpartition(":")
        rate = float(rate)
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} in {target!r}; kinds: {', '.join(FAULT_KINDS)}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate {rate} for {target!r} is not in [0, 1]")
        rules[(model or "*", kind)] = rate
    return rules


def _split_rule(rule: str) -> tuple[str, str]:
    target, sep, rate = str(rule).rpartition("=")
    if not sep or not target:
        raise ValueError(f"fault rule {rule!r}: expected KIND=RATE or MODEL:KIND=RATE")
    return target, rate


class FaultDraws:
    """Decides, reproducibly, which fault (if any) a request gets."""

    def __init__(self, rules: dict[tuple[str, str], float], seed: int):
        self.rules, self.seed = rules, seed
        self._seen: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def rates_for(self, model: str, kind: str = "review") -> dict[str, float]:
        rates = {fault: rate for (target, fault), rate in self.rules.items() if target == "*"}
        rates.update({fault: rate for (target, fault), rate in self.rules.items() if target == model})
        if kind != "review":
            rates.pop("out_of_scale", None)  # only a review has a score to put off the scale
        return rates

    def draw(self, model: str, kind: str, messages: Any) -> str | None:
        rates = self.rates_for(model, kind)
        if not any(rates.values()):
            return None
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True, default=str).encode()).hexdigest()
        with self._lock:
            occurrence = self._seen[(model, digest)]
            self._seen[(model, digest)] += 1
        unit = self._unit(f"{self.seed}|{model}|{digest}|{occurrence}")
        low = 0.0
        for kind in FAULT_KINDS:
            high = low + rates.get(kind, 0.0)
            if low <= unit < high:
                return kind
            low = high
        return None

    @staticmethod
    def _unit(text: str) -> float:
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()


# --------------------------------------------------------------------------------------------
# Stats


class Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._events: list[dict[str, Any]] = []
            self._in_flight: Counter[str] = Counter()
            self._max_in_flight_by_model: Counter[str] = Counter()
            self._max_in_flight = 0

    def begin(self, model: str, kind: str, fault: str | None) -> dict[str, Any]:
        event = {"model": model, "kind": kind, "fault": fault, "start": self._now(), "end": None}
        with self._lock:
            self._events.append(event)
            self._in_flight[model] += 1
            self._max_in_flight_by_model[model] = max(self._max_in_flight_by_model[model], self._in_flight[model])
            self._max_in_flight = max(self._max_in_flight, sum(self._in_flight.values()))
        return event

    def end(self, event: dict[str, Any]) -> None:
        with self._lock:
            event["end"] = self._now()
            self._in_flight[event["model"]] -= 1

    def _now(self) -> float:
        return round(time.monotonic() - self._started, 6)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            events = [dict(e) for e in self._events]
            max_by_model = dict(self._max_in_flight_by_model)
            max_in_flight = self._max_in_flight
        by_model_kind: dict[str, Counter] = defaultdict(Counter)
        faults_by_model: dict[str, Counter] = defaultdict(Counter)
        for event in events:
            by_model_kind[event["model"]][event["kind"]] += 1
            if event["fault"]:
                faults_by_model[event["model"]][event["fault"]] += 1
        return {
            "total": len(events),
            "by_kind": dict(Counter(e["kind"] for e in events)),
            "by_model": dict(Counter(e["model"] for e in events)),
            "by_model_kind": {m: dict(c) for m, c in by_model_kind.items()},
            "faults": dict(Counter(e["fault"] for e in events if e["fault"])),
            "faults_by_model": {m: dict(c) for m, c in faults_by_model.items()},
            "max_in_flight": max_in_flight,
            "max_in_flight_by_model": max_by_model,
            "events": events,
        }


# --------------------------------------------------------------------------------------------
# HTTP


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung ("timeout") request never blocks shutdown
    request_queue_size = 1024  # hundreds of clients may connect at once
    allow_reuse_address = True
    scripted: "ScriptedServer"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    # Headers and body go out in two writes: with Nagle on, the client's delayed ACK stalls each
    # keep-alive reply by ~40 ms.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlparse(self.path).path.rstrip("/")
        scripted = self.server.scripted
        if path == "/stats":
            self._send_json(200, scripted.stats())
        elif path in ("/v1/models", "/models"):
            data = [{"id": name, "object": "model", "owned_by": "scripted"} for name in scripted.models]
            self._send_json(200, {"object": "list", "data": data})
        elif path.startswith(("/v1/models/", "/models/")):
            self._send_json(200, {"id": path.split("/models/", 1)[1], "object": "model", "owned_by": "scripted"})
        elif path in ("/health", "/v1/health"):
            self._send_json(200, {"ok": True})
        else:
            self._send_json(404, {"error": {"message": f"no route {path}"}})

    def do_POST(self) -> None:  # noqa: N802
        path = urlparse(self.path).path.rstrip("/")
        body = self._read_json()
        if path == "/reset":
            self.server.scripted.reset()
            self._send_json(200, {"ok": True})
        elif path in ("/v1/chat/completions", "/chat/completions"):
            self.server.scripted.handle_chat(self, body if isinstance(body, dict) else {})
        else:
            self._send_json(404, {"error": {"message": f"no route {path}"}})

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            return {}

    def _send_json(self, status: int, data: Any) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class ScriptedServer:
    """The scripted server, run in a background thread (context manager) or by the CLI."""

    def __init__(
        self,
        latency_ms: float = 0,
        faults: Iterable[str] | Mapping[str, float] | None = None,
        seed: int = 0,
        port: int = 0,
        host: str = "127.0.0.1",
        models: Iterable[str] = (),
        policy: Policy | None = None,
        hang_s: float = 30.0,
        model_latency_ms: Mapping[str, float] | None = None,
    ):
        self.latency_s = latency_ms / 1000.0
        self.model_latency_s = {model: ms / 1000.0 for model, ms in (model_latency_ms or {}).items()}
        self.draws = FaultDraws(parse_fault_rules(faults), seed)
        self.policy: Policy = policy or DefaultPolicy()
        self.hang_s = hang_s
        fault_models = [target for target, _ in self.draws.rules if target != "*"]
        self.models = list(dict.fromkeys(["student-r0", *models, *fault_models]))
        self._stats = Stats()
        self._counter = iter(range(1, 1 << 62))
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.scripted = self
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def api_base(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}/v1"

    def start(self) -> "ScriptedServer":
        # A short poll interval: stop() (shutdown) returns within 0.1 s instead of 0.5 s.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.1,), name="scripted-server",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "ScriptedServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot()

    def reset(self) -> None:
        self._stats.reset()
        self.draws.reset()

    # -- one chat request --------------------------------------------------------------------

    def handle_chat(self, handler: _Handler, body: dict[str, Any]) -> None:
        request = parse_request(body)
        fault = self.draws.draw(request.model, request.kind, body.get("messages"))
        event = self._stats.begin(request.model, request.kind, fault)
        try:
            if fault == "timeout":
                time.sleep(self.hang_s)
                handler.close_connection = True  # hang up without an answer
                return
            time.sleep(self.model_latency_s.get(request.model, self.latency_s))
            if fault in ("429", "500"):
                message = "rate limit reached (scripted)" if fault == "429" else "internal error (scripted)"
                error_type = "rate_limit_error" if fault == "429" else "server_error"
                handler._send_json(int(fault), {"error": {"message": message, "type": error_type, "code": fault}})
                return
            texts = [render_reply(request, self.policy, fault) for _ in range(int(body.get("n") or 1))]
            prompt_chars = sum(len(_text_of(m)) for m in body.get("messages") or [])
            handler._send_json(200, completion_body(request.model, texts, prompt_chars, next(self._counter)))
        finally:
            self._stats.end(event)


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mapd_dspy.scripted_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed on the READY line)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="fixed latency of every chat request")
    parser.add_argument("--fault", action="append", default=[], metavar="[MODEL:]KIND=RATE",
                        help=f"inject a fault; kinds: {', '.join(FAULT_KINDS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", action="append", default=[], help="a name to list in /v1/models")
    parser.add_argument("--hang-s", type=float, default=30.0, help="how long a 'timeout' fault hangs")
    parser.add_argument("--model-latency", action="append", default=[], metavar="MODEL=MS",
                        help="this model's latency instead of --latency-ms")
    parser.add_argument("--student-answer", default="-1")
    parser.add_argument("--rationale-answer", default="42")
    parser.add_argument("--score", type=int, default=4, help="every review's score")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    policy = DefaultPolicy(args.student_answer, args.rationale_answer, args.score)
    try:
        model_latency = {model: float(ms) for model, _, ms in (rule.rpartition("=") for rule in args.model_latency)}
        server = ScriptedServer(args.latency_ms, args.fault, args.seed, args.port, args.host, args.model, policy,
                                args.hang_s, model_latency)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def stop(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"READY {server.api_base}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
