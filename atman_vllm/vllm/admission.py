"""Admission of AtMan payloads: the one place a request's payload is checked before it enters the engine.

Every request of every route — our gRPC service, vLLM's OpenAI-compatible
routes present and future, the offline ``LLM`` — passes through vLLM's
``InputProcessor.process_inputs`` in the front-end process, which turns it
into the ``EngineCoreRequest`` the engine core schedules. Wrapping it there
means a payload a client smuggled in (``vllm_xargs.atman``) is refused with
vLLM's own ``VLLMValidationError`` (HTTP 400 on vLLM's routes), and a payload
that breaks an invariant fails that request alone, before any engine step.
The scheduler and the worker then never see a payload they could choke on.
"""

from __future__ import annotations

from .wire import EXTRA_ARGS_KEY, AtmanRequestInfo, InvalidPayload, UnsealedPayload

FIELD = f"vllm_xargs.{EXTRA_ARGS_KEY}"


class RejectedPayload(RuntimeError):
    """A payload this process sealed but that does not fit its request: a bug of ours, not the client's."""


def admit(request) -> None:
    """Check the AtMan payload of an ``EngineCoreRequest`` (no payload: nothing to do)."""
    from vllm.exceptions import VLLMValidationError

    params = request.sampling_params
    extra_args = params.extra_args if params is not None else None
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return
    try:
        AtmanRequestInfo.admitted(extra_args, len(request.prompt_token_ids or ()))
    except UnsealedPayload as exc:
        raise VLLMValidationError(
            f"{FIELD}: {exc}; steer attention with the `controls` body fields and explain with "
            "POST /v1/explain", parameter=FIELD) from None
    except InvalidPayload as exc:
        raise RejectedPayload(f"atman payload of request {request.request_id} {exc}") from None


def install() -> None:
    """Wrap ``InputProcessor.process_inputs`` once; idempotent.

    ``AsyncLLM`` also binds ``process_inputs_async`` to the instance's
    ``process_inputs`` when the processor is built, so the wrapper must be in
    place before the engine is: the plugin runs before vLLM builds it.
    """
    from vllm.v1.engine.input_processor import InputProcessor

    from .seams import expect_function

    original = InputProcessor.process_inputs
    if getattr(original, "_atman", False):
        return
    expect_function("admission", InputProcessor, "process_inputs", ("request_id", "prompt", "params"))

    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        admit(request)
        return request

    process_inputs._atman = True
    process_inputs.__wrapped__ = original
    InputProcessor.process_inputs = process_inputs
