from __future__ import annotations

import pytest

from atman_vllm.models import FAMILIES


@pytest.fixture(scope="session")
def reference_explainers(tiny_models):
    """One ReferenceExplainer per family, shared (they hold no per-call state)."""
    from atman_vllm.reference import ReferenceExplainer

    return {family: ReferenceExplainer(tiny_models[family]) for family in FAMILIES}
