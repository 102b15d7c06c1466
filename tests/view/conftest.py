"""One real ``atman-vllm serve --openai`` on the embedded demo model, with a bearer token, for the /ui tests.

The server is launched the way tests/service launches its own (the same
helper), but on the demo model, so the page explains a model that has
learnt the demo task, and with a token, so the page's authentication is
exercised.
"""

from __future__ import annotations

import pytest

from tests.service.conftest import Server, _launch  # one way to start a test server

from .cdp import Browser, find_chromium

TOKEN = "ui-test-token"


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory) -> Server:
    from pathlib import Path

    import atman_vllm

    model = Path(atman_vllm.__file__).parent / "models" / "default"
    if not (model / "model.safetensors").exists():
        pytest.fail(f"the demo model is missing from {model}")
    server = _launch(model, tmp_path_factory.mktemp("ui") / "server.log", "--auth-token", TOKEN)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine: `make test` installs Debian's chromium where it runs as root "
                    "with apt-get (tests/view/install_chromium.sh); elsewhere install it to run the browser tests")
    b = Browser(executable)
    try:
        yield b
    finally:
        b.close()
