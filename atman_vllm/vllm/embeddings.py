"""Input-embedding rows for correlated suppression, read from the checkpoint.

The model's weights live in the engine process; the few rows that κ needs are
read straight from the safetensors files instead of asking the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# Input-embedding tensor names of the supported decoder families.
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")


class EmbeddingTable:
    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self._file, self._key = None, None
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():
                    if key.endswith(_EMBEDDING_SUFFIXES):
                        self._file, self._key = path, key
                        break
            if self._key:
                break

    @property
    def available(self) -> bool:
        return self._key is not None

    def rows(self, token_ids: Sequence[int]) -> np.ndarray | None:
        if not self.available:
            return None
        from safetensors import safe_open

        with safe_open(str(self._file), framework="pt") as f:  # pt: bf16 checkpoints load too
            table = f.get_slice(self._key)
            ids = list(token_ids)
            return np.stack([table[i:i + 1].float().numpy()[0] for i in ids]).astype(np.float64)
