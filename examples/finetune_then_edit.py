"""Fine-tune SmolLM2 on a text file, then write CounterFact facts into it at the end of fit.

The key statistics MEMIT needs come from the fine-tuning batches themselves (``statistics="train"``): the
callback's hooks record the MLP keys of every training token (padding masked), and at the end of fit it
computes one batched MEMIT edit of all requests, applies it, and reports the edit metrics before and after.

Run from the repository root (the defaults read ``../shared/data``)::

    python examples/finetune_then_edit.py
    python examples/finetune_then_edit.py --n 20 --steps 40 --text my_corpus.txt --requests my_facts.json

It prints a table of the metrics before and after the edit, and exits with status 1 when efficacy is below
0.9 or neighbourhood accuracy moved by more than 0.05.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model spec (default: smollm2)")
    parser.add_argument("--requests", default=str(SHARED / "counterfact" / "counterfact-val.json"))
    parser.add_argument("--n", type=int, default=20, help="requests to edit (default: 20)")
    parser.add_argument("--text", default=str(SHARED / "text" / "wikitext2_valid.txt"), help="fine-tuning text")
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps (default: 40)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5, help="fine-tuning learning rate (default: 1e-5)")
    parser.add_argument("--out", default="runs/finetune_then_edit", help="logs and the saved delta")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    seed_everything(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    module = KnowledgeEditModule(args.model, learning_rate=args.lr)
    data = TextDataModule(
        train_files=args.text,
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_tokens=args.steps * args.batch_size * args.block_size,
    )
    callback = KnowledgeEditCallback(
        args.requests,
        n_requests=args.n,
        statistics="train",
        edit_at="fit_end",
        metrics=["efficacy", "paraphrase", "neighborhood", "score"],
        save_delta_to=Path(args.out) / "deltas",
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        callbacks=[callback],
        logger=CSVLogger(args.out, name="logs"),
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(module, data)

    result = callback.history[-1]
    tokens = callback.statistics.count(callback.layers[0]) if callback.statistics is not None else 0
    print(f"\n{args.n} requests, {args.steps} fine-tuning steps, statistics from {tokens} training tokens, "
          f"edit {result['seconds']:.1f}s, total {time.perf_counter() - started:.0f}s")
    print(f"{'metric':<14}{'before':>9}{'after':>9}")
    for name in ("efficacy", "paraphrase", "neighborhood", "score"):
        print(f"{name:<14}{result[f'{name}_before']:>9.3f}{result[name]:>9.3f}")
    print(f"delta: {callback.applied[-1].path}")
    shift = abs(result["neighborhood"] - result["neighborhood_before"])
    ok = result["efficacy"] >= 0.9 and shift <= 0.05
    print("OK: the edits took and the neighbourhood held" if ok else "FAILED: efficacy < 0.9 or neighbourhood moved")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
