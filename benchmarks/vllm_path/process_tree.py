"""Memory and CPU time of a process and all its descendants, for the benchmarks.

vLLM's engine runs in child processes (engine core, worker), the stock
OpenAI server in another tree, so ``ru_maxrss`` of the benchmark process
alone would miss it. ``TreeSampler`` polls psutil in a thread instead.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import psutil


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(root: psutil.Process) -> int:
    """Sum of RSS over the tree. Shared pages (torch's libraries, mapped
    weights) count once per process, so this over-states real use a little."""
    return sum(tree_rss_by_process(root).values())


def tree_rss_by_process(root: psutil.Process) -> dict[str, int]:
    """RSS of every live process of the tree, by "pid name"."""
    out: dict[str, int] = {}
    for p in tree(root):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            out[f"{p.pid} {p.name()}"] = p.memory_info().rss
    return out


def tree_cpu_seconds(root: psutil.Process) -> dict[str, float]:
    """User + system CPU seconds of every live process of the tree (all threads), by
    "pid name" (vLLM names its processes, e.g. VLLM::EngineCore, VLLM::Worker)."""
    out: dict[str, float] = {}
    for p in tree(root):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            out[f"{p.pid} {p.name()}"] = t.user + t.system
    return out


@dataclass
class Window:
    """What one measured region saw."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    cpu_by_process: dict = field(default_factory=dict)
    peak_rss: int = 0
    start_rss: int = 0
    start_rss_by_process: dict = field(default_factory=dict)
    peak_rss_by_process: dict = field(default_factory=dict)  # each process's own peak (not at one instant)
    load_1m: float = 0.0  # machine load average at the end (other jobs share the cores)


class TreeSampler:
    """Samples the tree's RSS every ``interval_s`` in a daemon thread; ``window()``
    reports the peak, CPU seconds and wall time of the region it wraps."""

    def __init__(self, interval_s: float = 0.05):
        self.root = psutil.Process()
        self.interval_s = interval_s
        self._peak = 0
        self._peak_by_process: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            by_process = tree_rss_by_process(self.root)
            with self._lock:
                self._peak = max(self._peak, sum(by_process.values()))
                for k, v in by_process.items():
                    self._peak_by_process[k] = max(self._peak_by_process.get(k, 0), v)
            self._stop.wait(self.interval_s)

    def current_rss(self) -> int:
        return tree_rss(self.root)

    @contextlib.contextmanager
    def window(self):
        w = Window()
        w.start_rss_by_process = tree_rss_by_process(self.root)
        w.start_rss = sum(w.start_rss_by_process.values())
        with self._lock:
            self._peak = w.start_rss
            self._peak_by_process = dict(w.start_rss_by_process)
        cpu0, t0 = tree_cpu_seconds(self.root), time.perf_counter()
        try:
            yield w
        finally:
            w.wall_s = time.perf_counter() - t0
            cpu1 = tree_cpu_seconds(self.root)
            w.cpu_by_process = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items()}
            w.cpu_s = sum(w.cpu_by_process.values())
            with self._lock:
                w.peak_rss = max(self._peak, tree_rss(self.root))
                w.peak_rss_by_process = dict(self._peak_by_process)
            w.load_1m = psutil.getloadavg()[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
