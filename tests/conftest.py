from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "detr_reference.pt"
COCO_MINI = SHARED / "data" / "coco-mini"


@pytest.fixture(scope="session")
def reference() -> dict:
    """The tensors computed by the reference implementation (see ../shared/fixtures/README.md)."""
    if not FIXTURE.exists():
        raise FileNotFoundError(f"reference fixture missing: {FIXTURE} (../shared must sit next to the repo)")
    return torch.load(FIXTURE, weights_only=True)
