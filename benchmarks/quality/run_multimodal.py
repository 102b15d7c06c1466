"""Regenerate benchmarks/results/multimodal.md: explanation quality on images (the paper's Table 2).

    nice -n 10 .venv/bin/python benchmarks/quality/run_multimodal.py          # 100 held-out scenes
    .venv/bin/python benchmarks/quality/run_multimodal.py --n 10               # a smoke run

The shipped ``tiny-shapes-vlm`` on fresh scenes (``quality.multimodal.HELD_OUT_SEED``):
image tiles (the 4 × 4 grid of image tokens) ranked by each method's score against
the asked object's tiles; mAP / mAR and costs. Method details: atman_vllm/quality/multimodal.py.
Raw results: benchmarks/quality/output/multimodal.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "multimodal.md"
OUTPUT = ROOT / "benchmarks" / "quality" / "output" / "multimodal.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped tiny-shapes-vlm)")
    p.add_argument("--no-atman", action="store_true", help="baselines only")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine more threads is slower)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--output", type=Path, default=OUTPUT)
    args = p.parse_args(argv)

    from atman_vllm.quality.harness import ATMAN_VARIANTS
    from atman_vllm.quality.multimodal import HELD_OUT_SEED, SHIPPED_VLM_DIR, evaluate, write_outputs

    model_dir = args.model or SHIPPED_VLM_DIR
    started = time.time()
    report = evaluate(args.n, model_dir=model_dir, seed=HELD_OUT_SEED, threads=args.threads,
                      atman_variants=() if args.no_atman else tuple(ATMAN_VARIANTS))
    elapsed = time.time() - started
    report_path = model_dir / "training_report.json"
    training = json.loads(report_path.read_text()) if report_path.exists() else None
    if training is None:  # an untrained model (a smoke run): no training line
        training = {"seed": "?", "train_seconds": float("nan"), "torch_threads": "?",
                    "held_out_accuracy": float("nan"), "target_hidden_accuracy": float("nan")}
    preamble = "\n".join([
        "# Explanation quality on images (like the paper's Table 2)",
        "",
        f"Regenerate: `nice -n 10 .venv/bin/python benchmarks/quality/run_multimodal.py` (this run: "
        f"{elapsed / 60:.1f} min). Model: `tiny-shapes-vlm` (atman_vllm/models/shapes_vlm, trained by "
        f"`python -m atman_vllm.models.train_vlm --seed {training['seed']}` in {training['train_seconds'] / 60:.1f} "
        f"min on {training['torch_threads']} CPU thread(s): held-out accuracy {training['held_out_accuracy']:.3f}, "
        f"{training['target_hidden_accuracy']:.3f} with the asked object painted over).",
        "",
        f"{report.n_scenes} held-out scenes (seed {report.seed}; the model answers {report.accuracy:.1%} of them). "
        "Units: the 16 image tiles (4 × 4 grid of image tokens, 16 × 16 px each); positive = the tile holds a "
        "pixel of the asked object. AP / recall@k per scene as for text (atman_vllm/quality/metrics.py). "
        "Costs per scene: forward / backward passes through the decoder, wall time, peak extra memory. "
        "Baselines on plain transformers (pixel attributions summed per tile; ablation paints a tile with "
        "the background; IG from the background-only image).",
        "",
        "",
    ])
    write_outputs(report, args.results, args.output, preamble)
    print(args.results.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
