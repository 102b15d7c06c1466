"""Terminal rendering for the CLI and the server's demo; it lives in ``atman_vllm.view.terminal``."""

from atman_vllm.view.terminal import TOP_UNITS, explanation_group, render_explanation

__all__ = ["TOP_UNITS", "explanation_group", "render_explanation"]
