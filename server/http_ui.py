"""``GET /ui``: the explanation page (atman_vllm.view) on the HTTP server.

The page is static: it holds no data and no secret, and every call it makes
goes to this server's ``/v1`` API (explain, completions, models), which
vLLM's API-key middleware guards. So with ``--auth-token`` the page itself
loads without a token (that middleware guards only ``/v1`` paths) and the
person types the token into the page, which sends it as
``Authorization: Bearer`` with each API call; nothing reaches the model
without it. The content security policy keeps the page from talking to any
other origin or being framed.
"""

from __future__ import annotations

from functools import lru_cache

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

UI_PATH = "/ui"
MODELS_PATH = "/v1/models"
# Inline script and style only (the page is one file, to work offline and from `atman-vllm view`);
# fetches only to this origin; no plugins, no framing, no form posts elsewhere.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")


@lru_cache(maxsize=1)
def _page() -> str:
    from atman_vllm.view import page_html

    # Imported here, not at the top: http_app imports this module before it defines EXPLAIN_PATH.
    from .http_app import EXPLAIN_PATH, EXPLAIN_STREAM_PATH
    from .http_controls import COMPLETIONS_PATH

    return page_html(api={"explain": EXPLAIN_PATH, "explain_stream": EXPLAIN_STREAM_PATH,
                          "completions": COMPLETIONS_PATH, "models": MODELS_PATH})


def add_ui_routes(app: FastAPI) -> None:
    async def ui() -> HTMLResponse:
        return HTMLResponse(_page(), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                              "X-Content-Type-Options": "nosniff",
                                              "Referrer-Policy": "no-referrer"})

    app.add_api_route(UI_PATH, ui, methods=["GET"], include_in_schema=False)
