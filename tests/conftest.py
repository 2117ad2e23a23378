"""Shared fixtures. Tests use the `tiny` model spec; a converted-model cache is shared per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Repository layout: ../shared/data holds GSM8K and BBH (read-only) beside the checkout.
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"


def gsm8k_style_lines(n: int) -> str:
    """The first n GSM8K train records when ../shared/data is there, else n tiny-gsm problems: the
    same {"question", "answer" ending in "#### N"} records, so training tests run from any checkout."""
    if GSM8K_TRAIN.exists():
        return "".join(GSM8K_TRAIN.read_text().splitlines(keepends=True)[:n])
    import json

    from selfmtp.tasks.tiny_gsm import generate_problems

    return "".join(json.dumps(p) + "\n" for p in generate_problems(n, seed=0, split="train"))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the default `tiny` spec with `<mtp>`, float32, eval mode."""
    from selfmtp.models.loading import load_model

    return load_model("tiny", seed=0)


@pytest.fixture(scope="session")
def peaked():
    """`MTPModel` of the tiny model with its final norm scaled up: sharp, varied confidences, so
    ConfAdapt accepts different numbers of tokens per pass (the untrained tiny model is near uniform)."""
    from selfmtp.api import MTPModel
    from selfmtp.models.loading import load_model

    model, tokenizer = load_model("tiny", seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(40.0)
    return MTPModel(model, tokenizer)


def pytest_configure(config):
    # Keep the test suite reproducible and quiet on 2 cores.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
