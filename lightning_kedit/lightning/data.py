"""A ``LightningDataModule`` for causal-LM text files and for prompts to complete (text lines or request files).

Training, validation and test text is tokenised once, concatenated and cut into blocks of ``block_size`` tokens
(the last block is right-padded, so batches carry an ``attention_mask`` and ``labels`` of ``-100`` on padding).
Prediction prompts are one per line of a text file, or the filled edit prompts of a request file (``.json`` /
``.jsonl``, any layout :func:`~lightning_kedit.requests.load_requests` reads); they are left-padded for generation.

The tokenizer is taken from the ``LightningModule`` (its ``tokenizer`` attribute) at ``setup`` unless given.

Example::

    data = TextDataModule(train_files="train.txt", val_files="valid.txt", block_size=256, batch_size=4)
    trainer.fit(module, data)
    serving = TextDataModule(predict_file="requests.json", batch_size=16)
    completions = trainer.predict(module, serving)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_kedit.errors import KeditError
from lightning_kedit.token_batches import padded_batch, padding_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PromptDataset", "TextBlockDataset", "TextDataModule", "collate_blocks", "collate_prompts"]

# Not os.PathLike: in a LightningCLI signature it makes jsonargparse pass a file's contents instead of its path.
PathLike = str | Path
_REQUEST_SUFFIXES = (".json", ".jsonl")


class TextBlockDataset(Dataset[torch.Tensor]):
    """Consecutive blocks of ``block_size`` token ids cut from a token stream (the last one may be shorter)."""

    def __init__(self, token_ids: Sequence[int], block_size: int) -> None:
        if block_size < 2:
            raise KeditError(f"`block_size` must be >= 2 (a token and its successor), got {block_size}")
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        self.blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size) if len(ids) - i >= 2]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.blocks[index]


class PromptDataset(Dataset[str]):
    """Prompts to complete, as strings."""

    def __init__(self, prompts: Sequence[str]) -> None:
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]


def collate_blocks(blocks: Sequence[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token blocks: ``input_ids``, ``attention_mask`` (1 on tokens) and ``labels`` (-100 on padding).

    Example:
        >>> batch = collate_blocks([torch.tensor([5, 6, 7]), torch.tensor([8, 9])], pad_id=0)
        >>> batch["attention_mask"].tolist(), batch["labels"].tolist()
        ([[1, 1, 1], [1, 1, 0]], [[5, 6, 7], [8, 9, -100]])
    """
    input_ids, attention_mask = padded_batch(blocks, pad_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Tokenise and left-pad prompts for generation; keeps the texts under ``"prompts"``."""
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    input_ids, attention_mask = padded_batch(encoded, padding_id(tokenizer, fallback=None), "left")
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompts": list(prompts)}


def _as_paths(files: PathLike | Sequence[PathLike] | None, name: str) -> list[Path]:
    if files is None:
        return []
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    paths = [Path(f).expanduser() for f in items]
    for path in paths:
        if not path.is_file():
            raise KeditError(f"`{name}`: text file {str(path)!r} not found; give an existing UTF-8 text file")
    return paths


class TextDataModule(LightningDataModule):
    """Text files for fine-tuning and evaluation, prompts (text lines or a request file) for prediction.

    Args:
        train_files: text file(s) for ``fit``.
        val_files: text file(s) for validation (perplexity).
        test_files: text file(s) for ``test``.
        predict_file: prompts to complete: a text file with one prompt per line, or a request file
            (``.json``/``.jsonl``) whose filled edit prompts are used.
        tokenizer: the tokenizer; taken from the ``LightningModule``'s ``tokenizer`` at ``setup`` when omitted.
        block_size: tokens per training / evaluation block.
        batch_size: examples per batch.
        max_tokens: keep at most this many tokens of each split (None: all).
        n_prompts: keep at most this many prediction prompts (None: all).
        shuffle: shuffle the training blocks each epoch.
        num_workers: data loader worker processes.

    Example:
        >>> TextDataModule(block_size=1)
        Traceback (most recent call last):
        ...
        lightning_kedit.errors.KeditError: `block_size` must be >= 2 (a token and its successor), got 1
    """

    def __init__(
        self,
        train_files: PathLike | list[PathLike] | None = None,
        val_files: PathLike | list[PathLike] | None = None,
        test_files: PathLike | list[PathLike] | None = None,
        predict_file: PathLike | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        block_size: int = 128,
        batch_size: int = 8,
        max_tokens: int | None = None,
        n_prompts: int | None = None,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if block_size < 2:
            raise KeditError(f"`block_size` must be >= 2 (a token and its successor), got {block_size}")
        if batch_size < 1:
            raise KeditError(f"`batch_size` must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 2:
            raise KeditError(f"`max_tokens` must be >= 2 or None, got {max_tokens}")
        if n_prompts is not None and n_prompts < 1:
            raise KeditError(f"`n_prompts` must be >= 1 or None, got {n_prompts}")
        if num_workers < 0:
            raise KeditError(f"`num_workers` must be >= 0, got {num_workers}")
        self.files = {
            "train": _as_paths(train_files, "train_files"),
            "val": _as_paths(val_files, "val_files"),
            "test": _as_paths(test_files, "test_files"),
        }
        self.predict_file = None if predict_file is None else _as_paths(predict_file, "predict_file")[0]
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.n_prompts = n_prompts
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset[Any]] = {}

    def setup(self, stage: str) -> None:
        """Tokenise the splits the stage needs (once; later calls reuse them)."""
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
            if self.tokenizer is None:
                raise KeditError(
                    "TextDataModule has no tokenizer: pass `tokenizer=` or use a LightningModule with a "
                    "`tokenizer` attribute (such as KnowledgeEditModule)"
                )
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in needed.get(stage, ()):
            if split in self.datasets:
                continue
            if split == "predict":
                if self.predict_file is not None:
                    self.datasets[split] = PromptDataset(self._read_prompts(self.predict_file))
            elif self.files[split]:
                self.datasets[split] = TextBlockDataset(self._read_tokens(self.files[split]), self.block_size)

    def _read_tokens(self, paths: Sequence[Path]) -> list[int]:
        assert self.tokenizer is not None
        ids: list[int] = []
        for path in paths:
            text = path.read_text(encoding="utf-8", errors="replace")
            if self.max_tokens is not None:
                # A token is rarely shorter than one character: never tokenise much more than is kept.
                text = text[: 16 * (self.max_tokens - len(ids))]
            ids.extend(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if self.max_tokens is not None and len(ids) >= self.max_tokens:
                return ids[: self.max_tokens]
        return ids

    def _read_prompts(self, path: Path) -> list[str]:
        if path.suffix.lower() in _REQUEST_SUFFIXES:
            from lightning_kedit.requests import load_requests

            prompts = [request.prompt_text for request in load_requests(path, n=self.n_prompts)]
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            prompts = [line.strip() for line in lines if line.strip()][: self.n_prompts]
        if not prompts:
            raise KeditError(f"`predict_file` {str(path)!r} holds no prompts; give one prompt per line")
        return prompts

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader[Any]:
        if split not in self.datasets:
            option = "predict_file" if split == "predict" else f"{split}_files"
            raise KeditError(f"TextDataModule has no {split} data; pass `{option}=`")
        tokenizer = self.tokenizer
        assert tokenizer is not None
        if split == "predict":
            collate: Any = _PromptCollator(tokenizer)
        else:
            collate = _BlockCollator(padding_id(tokenizer, fallback=None))
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train", shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader[Any] | list[Any]:
        # No validation files: an empty list tells the Trainer to skip validation.
        return self._loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader[Any]:
        return self._loader("predict")


class _BlockCollator:
    # A class rather than a closure so that loaders pickle for worker processes and ddp_spawn.
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, blocks: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return collate_blocks(blocks, self.pad_id)


class _PromptCollator:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def __call__(self, prompts: Sequence[str]) -> dict[str, Any]:
        return collate_prompts(prompts, self.tokenizer)
