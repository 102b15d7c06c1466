"""Clean-up of the vLLM engine client that vLLM's own shutdown leaves to the garbage collector."""

from __future__ import annotations


def close_engine_sockets(core_client) -> None:
    """Close the engine client's ZeroMQ sockets with linger 0 after a shutdown.

    vLLM's shutdown leaves its ZeroMQ context to the garbage collector. If a
    socket of it is still open then (in asyncio mode vLLM closes them on the
    event loop, which may be gone), pyzmq's finaliser terminates the context
    with the sockets' default linger, waiting forever for messages to an
    engine process that has exited. vLLM runs ``gc.collect()`` while loading
    a model, so the next engine started in the same process hung (seen once
    in the test suite). Closing the sockets here makes that termination
    immediate. Touch point 11 in docs/vllm_touchpoints.md.
    """
    ctx = getattr(core_client, "ctx", None)
    for c in (ctx, getattr(ctx, "_shadow_obj", None)):
        for sock in list(getattr(c, "_sockets", None) or ()):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
