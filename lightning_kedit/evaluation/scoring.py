"""Batched log-likelihood of answers given prompts: the measurement every edit metric is built on.

For a pair (prompt, answer) the answer is joined to the prompt with the tokenizer's own word-boundary
convention (a space, unless the prompt ends with or the answer starts with whitespace), the prompt and the
joined text are tokenized with the tokenizer's own special-token behaviour (a BOS is kept when the tokenizer
adds one), and the answer tokens are the suffix of the joined text after the longest common prefix with the
prompt. With :math:`a_1..a_m` the answer tokens and :math:`c` the context before them,

.. math:: \\log p(a \\mid c) = \\sum_{i=1}^{m} \\log p(a_i \\mid c, a_{<i}),

summed in float64. The token accuracy is the fraction of answer tokens that are the argmax given the gold
prefix (teacher forcing, as in the zsRE evaluation of MEND and ROME).

Pairs that share a context cost one forward: the logits needed by a pair are those at the positions of
``context + answer[:-1]``, so any token sequence that *starts with* those tokens serves it. The pairs are
reduced to the few sequences that are not a prefix of another (a single-token new target and true target on
the same prompt are both read from one forward of the prompt alone), sorted by length and padded in batches.
Position ids are derived from the attention mask, so right and left padding give the same scores, and the LM
head runs only at the positions read (``logits_to_keep``) when the model accepts it.

Example:
    >>> model, tokenizer = load_model("smollm2")  # doctest: +SKIP
    >>> scores = score_answers(model, tokenizer, ["The Eiffel Tower is in"] * 2, ["Paris", "Rome"])  # doctest: +SKIP
    >>> scores.nll  # mean negative log-likelihood per answer token, float64  # doctest: +SKIP
    tensor([1.2031, 5.8710], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import forward_parameters
from lightning_kedit.token_batches import padded_batch

__all__ = [
    "AnswerScores",
    "answer_log_probs",
    "answer_nll",
    "answer_token_accuracy",
    "encode_pairs",
    "join_answer",
    "score_answers",
    "special_affixes",
    "token_scores",
]


@dataclass(frozen=True)
class AnswerScores:
    """Scores of ``N`` (prompt, answer) pairs.

    Attributes:
        log_prob: ``(N,)`` float64, the summed log-probability of each answer's tokens.
        num_tokens: ``(N,)`` int64, the number of answer tokens.
        num_correct: ``(N,)`` int64, how many answer tokens are the argmax given the gold prefix.
    """

    log_prob: Tensor
    num_tokens: Tensor
    num_correct: Tensor

    @property
    def nll(self) -> Tensor:
        """Mean negative log-likelihood per answer token, ``(N,)`` float64."""
        return -self.log_prob / self.num_tokens

    @property
    def token_accuracy(self) -> Tensor:
        """Fraction of answer tokens predicted by argmax given the gold prefix, ``(N,)`` float64."""
        return self.num_correct.double() / self.num_tokens


def join_answer(prompt: str, answer: str) -> str:
    """``prompt`` and ``answer`` joined with a word boundary (a space unless whitespace is already there)."""
    if not prompt or prompt[-1].isspace() or answer[:1].isspace():
        return prompt + answer
    return f"{prompt} {answer}"


def special_affixes(tokenizer: Any) -> tuple[list[int], int]:
    """The special tokens the tokenizer puts before a text (e.g. a BOS), and how many it appends after it.

    Found from the tokenizer's own behaviour on a short text, never assumed.

    Example:
        >>> special_affixes(gpt2_tokenizer)  # doctest: +SKIP
        ([], 0)
    """
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start], len(with_special) - start - len(plain)
    return [], 0


def _encode(tokenizer: Any, texts: list[str], suffix: int) -> list[list[int]]:
    # Special tokens in front (a BOS) are kept; those appended (an EOS) would sit between context and
    # answer, so they are dropped.
    return [list(ids)[: len(ids) - suffix] for ids in tokenizer(texts)["input_ids"]]


def encode_pairs(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[tuple[list[int], int]]:
    """Tokenize pairs as ``(ids of prompt + answer, number of context tokens before the answer)``.

    Args:
        tokenizer: a Hugging Face tokenizer (its special-token and padding settings are left unchanged).
        prompts: the prompts, with the subject written in.
        answers: one answer per prompt, without a leading space.

    Raises:
        KeditError: lengths differ, an answer adds no token, or no token precedes the answer.

    Example:
        >>> encode_pairs(tokenizer, ["Paris is in"], ["France"])  # doctest: +SKIP
        [([40, 17, 291, 1110], 3)]
    """
    if len(prompts) != len(answers):
        raise KeditError(f"got {len(prompts)} prompts but {len(answers)} answers; give one answer per prompt")
    if not prompts:
        return []
    _, suffix = special_affixes(tokenizer)
    unique_prompts = list(dict.fromkeys(prompts))
    prompt_ids = dict(zip(unique_prompts, _encode(tokenizer, unique_prompts, suffix), strict=True))
    full_ids = _encode(tokenizer, [join_answer(p, a) for p, a in zip(prompts, answers, strict=True)], suffix)
    pairs = []
    for prompt, answer, ids in zip(prompts, answers, full_ids, strict=True):
        if not answer.strip():
            raise KeditError(f"answer {answer!r} to prompt {prompt!r} is empty; give a non-empty answer")
        context = prompt_ids[prompt]
        shared = 0
        limit = min(len(context), len(ids))
        while shared < limit and context[shared] == ids[shared]:
            shared += 1
        if shared == len(ids):
            raise KeditError(f"answer {answer!r} to prompt {prompt!r} gives no token; give a longer answer")
        if shared == 0:
            raise KeditError(
                f"prompt {prompt!r} gives no token before the answer and the tokenizer adds no BOS; "
                "give a non-empty prompt"
            )
        pairs.append((ids, shared))
    return pairs


def _plan_sequences(pairs: Sequence[tuple[list[int], int]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The fewest token sequences that serve every pair, and the sequence that serves each pair.

    A pair needs the logits at the positions of ``ids[:-1]``; a sequence serves it when it starts with those
    tokens. In lexicographic order a needed input that is a prefix of any other is a prefix of its successor,
    so one backward sweep assigns each input to the longest sequence that extends it.
    """
    needed = sorted({tuple(ids[:-1]) for ids, _ in pairs})
    sequences: list[tuple[int, ...]] = []
    cover: dict[tuple[int, ...], int] = {}
    successor: tuple[int, ...] | None = None
    for tokens in reversed(needed):
        if successor is not None and successor[: len(tokens)] == tokens:
            cover[tokens] = cover[successor]
        else:
            cover[tokens] = len(sequences)
            sequences.append(tokens)
        successor = tokens
    return sequences, [cover[tuple(ids[:-1])] for ids, _ in pairs]


def token_scores(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 log-probability of each target token and whether it is the argmax.

    Args:
        logits: ``(K, V)`` next-token logits.
        targets: ``(K,)`` token ids.

    Returns:
        ``(K,)`` float64 ``log softmax(logits)[target]`` and ``(K,)`` bool ``argmax(logits) == target``.
    """
    if logits.device.type == "mps":  # MPS has no float64
        logits, targets = logits.cpu(), targets.cpu()
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return log_probs.gather(-1, targets[:, None]).squeeze(-1), logits.argmax(-1) == targets


def _pad(
    sequences: list[tuple[int, ...]], pad_id: int, side: Literal["right", "left"], device: torch.device
) -> tuple[Tensor, ...]:
    ids, mask = padded_batch(sequences, pad_id, side)
    # Positions count real tokens only, so a left-padded row sees the same positions as an unpadded one.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _reads(
    served: Sequence[list[int]], offsets: Sequence[int], pairs: Sequence[tuple[list[int], int]]
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Row, column, target token and pair of every answer token read from a padded batch."""
    rows, cols, targets, owners = [], [], [], []
    for row, (row_pairs, offset) in enumerate(zip(served, offsets, strict=True)):
        for pair in row_pairs:
            ids, start = pairs[pair]
            # The logits at position t - 1 predict token t.
            for t in range(start, len(ids)):
                rows.append(row)
                cols.append(offset + t - 1)
                targets.append(ids[t])
                owners.append(pair)
    return rows, cols, targets, owners


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def score_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = False,
    padding_side: Literal["right", "left"] = "right",
) -> AnswerScores:
    """Score each answer given its prompt in padded batches (see the module docstring for the definition).

    Args:
        model: a causal language model; it is put in eval mode for the call and restored after.
        tokenizer: its tokenizer (never modified).
        prompts: the prompts.
        answers: one answer per prompt.
        batch_size: sequences per forward.
        progress: show a tqdm bar on stderr.
        padding_side: where batches are padded; positions are given explicitly so both give the same scores.

    Example:
        >>> scores = score_answers(model, tokenizer, ["Rome is in"], ["Italy"])  # doctest: +SKIP
        >>> scores.log_prob.dtype, int(scores.num_tokens[0])  # doctest: +SKIP
        (torch.float64, 1)
    """
    if batch_size < 1:
        raise KeditError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    if padding_side not in ("right", "left"):
        raise KeditError(f"`padding_side` must be 'right' or 'left', got {padding_side!r}")
    pairs = encode_pairs(tokenizer, prompts, answers)
    log_prob = torch.zeros(len(pairs), dtype=torch.float64)
    num_correct = torch.zeros(len(pairs), dtype=torch.long)
    num_tokens = torch.tensor([len(ids) - start for ids, start in pairs], dtype=torch.long)
    if not pairs:
        return AnswerScores(log_prob, num_tokens, num_correct)
    sequences, owner = _plan_sequences(pairs)
    served: list[list[int]] = [[] for _ in sequences]
    for pair, sequence in enumerate(owner):
        served[sequence].append(pair)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    batches: Iterable[list[int]] = list(_batches([len(s) for s in sequences], batch_size))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch", leave=False)
    keep_some = "logits_to_keep" in forward_parameters(model)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids, mask, positions = _pad([sequences[i] for i in batch], pad_id, padding_side, device)
            offsets = [ids.shape[1] - len(sequences[i]) if padding_side == "left" else 0 for i in batch]
            rows, cols, targets, owners = _reads([served[i] for i in batch], offsets, pairs)
            inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
            if keep_some:
                # The LM head runs only on the columns some answer token is read from.
                kept = sorted(set(cols))
                column = {c: i for i, c in enumerate(kept)}
                cols = [column[c] for c in cols]
                inputs["logits_to_keep"] = torch.tensor(kept, device=device)
            logits = model(**inputs, use_cache=False).logits
            picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
            token_log_prob, correct = token_scores(picked, torch.tensor(targets, device=device))
            owner_index = torch.tensor(owners)
            log_prob.index_add_(0, owner_index, token_log_prob.cpu())
            num_correct.index_add_(0, owner_index, correct.long().cpu())
    finally:
        model.train(was_training)
    return AnswerScores(log_prob, num_tokens, num_correct)


def answer_log_probs(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 32
) -> tuple[Tensor, Tensor]:
    """Per pair, the float64 sum of the answer tokens' log-probabilities and the answer's token count.

    Example:
        >>> log_prob, count = answer_log_probs(model, tokenizer, ["Rome is in"], ["Italy"])  # doctest: +SKIP
    """
    scores = score_answers(model, tokenizer, prompts, answers, batch_size=batch_size)
    return scores.log_prob, scores.num_tokens


def answer_nll(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 32
) -> Tensor:
    """Per pair, the mean negative log-likelihood of the answer's tokens (float64).

    Example:
        >>> answer_nll(model, tokenizer, ["Rome is in", "Rome is in"], ["Italy", "France"])  # doctest: +SKIP
    """
    return score_answers(model, tokenizer, prompts, answers, batch_size=batch_size).nll


def answer_token_accuracy(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 32
) -> Tensor:
    """Per pair, the fraction of answer tokens that are the argmax given the gold prefix (float64).

    Example:
        >>> answer_token_accuracy(model, tokenizer, ["Rome is in"], ["Italy"])  # doctest: +SKIP
    """
    return score_answers(model, tokenizer, prompts, answers, batch_size=batch_size).token_accuracy
