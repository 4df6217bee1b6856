"""Evaluation of any causal LM (dense or with per-layer shapes): perplexity, KL to a reference,
zero-shot multiple choice, parameter counts.

Everything runs under ``torch.inference_mode`` and accumulates in float64; logits are reduced one
sequence at a time so a large vocabulary (Gemma: 262k) does not multiply the memory by the batch size.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tyrsearch.assets import task_data_path
from tyrsearch.data import bos_id, eval_batches
from tyrsearch.errors import UserError

KNOWN_TASKS: tuple[str, ...] = ("arc_easy", "piqa", "hellaswag", "winogrande")


def _chunks(batches: torch.Tensor, batch_size: int, *, desc: str, progress: bool) -> Iterator[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, batches.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        yield batches[start : start + batch_size]


def _logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, keep: range | None = None
) -> tuple[torch.Tensor, int]:
    """Float logits and the position of their first column: only positions in ``keep`` when the model
    takes ``logits_to_keep`` (the LM head is most of the compute with a large vocabulary), else all."""
    kwargs = {"input_ids": input_ids.to(model.device), "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(model.device)
    first = 0
    if keep is not None and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = torch.arange(keep.start, keep.stop, device=model.device)
        first = keep.start
    return model(**kwargs).logits.float(), first


# ---------------------------------------------------------------------------------------------------------
# Perplexity


@torch.inference_mode()
def perplexity(model, batches: torch.Tensor, *, batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity on token batches [n, L]: ``{"ppl", "nll", "tokens"}``.

    Position t predicts token t+1, so each sequence contributes L-1 targets (the first token, BOS or not,
    is never a target). ``nll`` is the mean negative log-likelihood per target token (nats) and
    ``ppl = exp(nll)``.
    """
    total, count = 0.0, 0
    for chunk in _chunks(batches, batch_size, desc="perplexity", progress=progress):
        logits = _logits(model, chunk)[0]
        targets = chunk[:, 1:].to(logits.device)
        for row in range(chunk.shape[0]):
            nll = F.cross_entropy(logits[row, :-1], targets[row], reduction="none")
            total += nll.double().sum().item()
            count += targets.shape[1]
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


# ---------------------------------------------------------------------------------------------------------
# KL divergence to a dense reference


@dataclass(frozen=True)
class Reference:
    """Next-token log-probabilities of a reference model on fixed batches, computed once.

    At positions 0..L-2 of each sequence: ``log_probs`` [n, L-1, k] are the top-k log-softmax values over
    the full vocabulary, sorted descending, ``indices`` [n, L-1, k] their token ids and ``rest`` [n, L-1]
    (float64) the probability mass outside them. With all tokens kept, ``log_probs`` is [n, L-1, V] in
    vocabulary order and ``indices`` and ``rest`` are None.
    """

    batches: torch.Tensor
    log_probs: torch.Tensor
    indices: torch.Tensor | None
    rest: torch.Tensor | None

    @property
    def k(self) -> int | None:
        return None if self.indices is None else self.log_probs.shape[-1]

    def head(self, sequences: int) -> Reference:
        """The reference on its first `sequences` sequences only."""
        cut = slice(0, sequences)
        return Reference(batches=self.batches[cut], log_probs=self.log_probs[cut],
                         indices=None if self.indices is None else self.indices[cut],
                         rest=None if self.rest is None else self.rest[cut])

    def kl_sum(self, first: int, logits: torch.Tensor) -> tuple[float, int]:
        """Summed KL(reference || model) and the position count for sequences first.. given the model's
        logits [b, L, V] on them (the last position predicts nothing and is ignored)."""
        total, positions = 0.0, 0
        for row in range(logits.shape[0]):
            lp = torch.log_softmax(logits[row, :-1].float(), dim=-1)
            total += float(_kl_row(lp, self.log_probs[first + row], None if self.indices is None else
                                   self.indices[first + row], None if self.rest is None else self.rest[first + row]))
            positions += lp.shape[0]
        return total, positions



def held_out(model, tokenizer, texts: dict[str, str], *, seq_len: int, max_tokens: int,
             progress: bool = True) -> dict[str, dict]:
    """``{name: perplexity(...)}`` on the first ``max_tokens`` of each text, in windows of ``seq_len``."""
    return {name: perplexity(model, eval_batches(tokenizer, text, seq_len=seq_len, max_tokens=max_tokens),
                             progress=progress) for name, text in texts.items()}

def _mass(log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs.exp().sum(-1, dtype=torch.float64)


def _top(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs, their ids and the mass outside them, for log-probs [T, V].

    The rest is the float64 difference of two sums of the same float32 probabilities, so it is exactly
    the mass of the other tokens (0 when k == V) rather than 1 - sum(top), which float32 rounding of
    the log-probs would turn into noise of about 1e-7.
    """
    top = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
    rest = (_mass(log_probs) - _mass(top.values)).clamp_min(0.0)
    return top.values, top.indices, rest


@torch.inference_mode()
def dense_topk(model, batches: torch.Tensor, *, k: int | None, batch_size: int = 4, progress: bool = True) -> Reference:
    """Run the reference model once and keep its top-``k`` next-token log-probs (all when ``k`` is None;
    that stores n*(L-1)*V floats)."""
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None, got {k}")
    values, indices, rests = [], [], []
    for chunk in _chunks(batches, batch_size, desc="reference", progress=progress):
        logits = _logits(model, chunk)[0][:, :-1]
        for row in range(chunk.shape[0]):
            log_probs = torch.log_softmax(logits[row], dim=-1)
            if k is None:
                values.append(log_probs.cpu())
            else:
                top_values, top_indices, rest = _top(log_probs, k)
                values.append(top_values.cpu())
                indices.append(top_indices.cpu())
                rests.append(rest.cpu())
    return Reference(
        batches=batches,
        log_probs=torch.stack(values),
        indices=torch.stack(indices) if indices else None,
        rest=torch.stack(rests) if rests else None,
    )


def _kl_full(ref_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(P_ref || P) with full-vocabulary log-probs [T, V]."""
    p = ref_lp.exp()
    terms = torch.where(p > 0, p * (ref_lp - lp), 0.0)  # 0 log 0 = 0, also for -inf logits
    return terms.sum(-1, dtype=torch.float64).sum()


def _kl_topk(ref_top: torch.Tensor, ref_rest: torch.Tensor, top: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Sum over positions of the KL between the (k+1)-bucket coarse-grainings (the reference's top-k
    tokens and one bucket for all others). ``ref_top``/``top`` [T, k]: full-vocabulary log-probs of the
    reference / model at those tokens; ``ref_rest``/``rest`` [T]: the mass outside them."""
    ref_top, top = ref_top.double(), top.double()
    p = ref_top.exp()
    head = torch.where(p > 0, p * (ref_top - top), 0.0).sum(-1)
    # The model may put (numerically) no mass outside the reference's top-k: clamp to keep it finite.
    tail = torch.xlogy(ref_rest, ref_rest) - torch.xlogy(ref_rest, rest.clamp_min(torch.finfo(torch.float64).tiny))
    return (head + tail).sum()


def _kl_row(lp: torch.Tensor, ref_lp: torch.Tensor, ref_idx: torch.Tensor | None,
            ref_rest: torch.Tensor | None) -> torch.Tensor:
    """Summed KL of one sequence: model log-probs [T, V] against the reference's (full or top-k) row."""
    ref_lp = ref_lp.to(lp.device)
    if ref_idx is None:
        return _kl_full(ref_lp, lp)
    top = lp.gather(-1, ref_idx.to(lp.device))
    rest = (_mass(lp) - _mass(top)).clamp_min(0.0)
    return _kl_topk(ref_lp, ref_rest.to(lp.device), top, rest)


_RowRef = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # (log-probs, ids, rest)


def _reference_rows(
    reference, batches: torch.Tensor, top_k: int | None, batch_size: int, progress: bool
) -> Iterator[tuple[torch.Tensor, list[_RowRef]]]:
    """Yield each input chunk with, per sequence, the reference's full log-probs (ids and rest None) or
    its top-k log-probs, their ids and the mass outside them."""
    if not isinstance(reference, Reference):
        for chunk in _chunks(batches, batch_size, desc="KL", progress=progress):
            logits = _logits(reference, chunk)[0][:, :-1]
            rows = []
            for row in range(chunk.shape[0]):
                log_probs = torch.log_softmax(logits[row], dim=-1)
                rows.append((log_probs, None, None) if top_k is None else _top(log_probs, top_k))
            yield chunk, rows
        return
    if reference.k is not None and top_k is not None and top_k > reference.k:
        raise ValueError(f"top_k={top_k} exceeds the k={reference.k} stored in the reference")
    start = 0
    for chunk in _chunks(batches, batch_size, desc="KL", progress=progress):
        rows = []
        for i in range(start, start + chunk.shape[0]):
            log_probs = reference.log_probs[i]
            if reference.indices is None:
                rows.append((log_probs, None, None) if top_k is None else _top(log_probs, top_k))
            elif top_k is None or top_k == reference.k:
                rows.append((log_probs, reference.indices[i], reference.rest[i]))
            else:  # a prefix of the sorted top-k; the dropped tokens join the rest
                dropped = _mass(log_probs[:, top_k:])
                rows.append((log_probs[:, :top_k], reference.indices[i, :, :top_k], reference.rest[i] + dropped))
        start += chunk.shape[0]
        yield chunk, rows


@torch.inference_mode()
def kl_divergence(
    model,
    reference,
    batches: torch.Tensor | None = None,
    *,
    batch_size: int = 4,
    top_k: int | None = None,
    progress: bool = False,
) -> float:
    """Mean over token positions of KL(P_ref || P_model) of the next-token distributions (nats).

    Positions 0..L-2 of every sequence count (the same L-1 positions as ``perplexity``).
    ``reference`` is a model or a ``Reference`` from ``dense_topk`` (then ``batches`` defaults to the
    reference's batches and must equal them).

    Full vocabulary (``top_k`` None and a model or a full ``Reference``):
    ``sum_v p(v) (log p(v) - log q(v))`` with p the reference's and q the model's softmax.

    Top-k (``top_k`` given, or a ``Reference`` that stores only its top-k): S is the reference's top-k
    tokens at the position; both distributions are coarse-grained to the k+1 outcomes "each token of S"
    and "any other token": ``sum_{v in S} p(v) log(p(v)/q(v)) + p_rest log(p_rest/q_rest)`` with
    ``p_rest = 1 - sum_S p``, ``q_rest = 1 - sum_S q`` (p, q full-vocabulary softmax). It is a true KL,
    so it is >= 0, exactly 0 for identical models, never above the full-vocabulary KL (data processing
    inequality) and equal to it at k = V.
    """
    if isinstance(reference, Reference):
        if batches is None:
            batches = reference.batches
        elif batches is not reference.batches and not torch.equal(batches, reference.batches):
            raise ValueError("batches differ from those the reference was computed on")
    elif batches is None:
        raise ValueError("batches are required when the reference is a model")
    total = torch.zeros((), dtype=torch.float64)
    positions = 0
    for chunk, rows in _reference_rows(reference, batches, top_k, batch_size, progress):
        logits = _logits(model, chunk)[0][:, :-1]
        for row, (ref_lp, ref_idx, ref_rest) in enumerate(rows):
            lp = torch.log_softmax(logits[row], dim=-1)
            total += _kl_row(lp, ref_lp, ref_idx, ref_rest).cpu()
            positions += lp.shape[0]
    return float(total / positions)


# ---------------------------------------------------------------------------------------------------------
# Zero-shot multiple choice (formats as lm-evaluation-harness)


@dataclass(frozen=True)
class _Example:
    contexts: tuple[str, ...]  # one per choice (WinoGrande) or the same for all
    continuations: tuple[str, ...]  # scored text, with its leading delimiter
    norm_lengths: tuple[int, ...]  # characters for acc_norm (the choice text, as the harness)
    gold: int


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _arc(doc: dict) -> _Example:
    choices = doc["choices"]["text"]
    ctx = f"Question: {doc['question']}\nAnswer:"
    return _Example(
        contexts=(ctx,) * len(choices),
        continuations=tuple(f" {c}" for c in choices),
        norm_lengths=tuple(len(c) for c in choices),
        gold=doc["choices"]["label"].index(doc["answerKey"]),
    )


def _piqa(doc: dict) -> _Example:
    choices = (doc["sol1"], doc["sol2"])
    ctx = f"Question: {doc['goal']}\nAnswer:"
    return _Example(
        contexts=(ctx, ctx),
        continuations=tuple(f" {c}" for c in choices),
        norm_lengths=tuple(len(c) for c in choices),
        gold=int(doc["label"]),
    )


def _hellaswag(doc: dict) -> _Example:
    ctx = _hellaswag_clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
    choices = [_hellaswag_clean(e) for e in doc["endings"]]
    return _Example(
        contexts=(ctx,) * len(choices),
        continuations=tuple(f" {c}" for c in choices),
        norm_lengths=tuple(len(c) for c in choices),
        gold=int(doc["label"]),
    )


def _winogrande(doc: dict) -> _Example:
    # Partial evaluation: the option fills the blank in the context; only the rest is scored.
    cut = doc["sentence"].index("_")
    rest = doc["sentence"][cut + 1 :].strip()
    options = (doc["option1"], doc["option2"])
    return _Example(
        contexts=tuple(doc["sentence"][:cut] + o for o in options),
        continuations=(f" {rest}",) * 2,
        norm_lengths=(len(rest),) * 2,
        gold=int(doc["answer"]) - 1,
    )


_FORMATS: dict[str, Callable[[dict], _Example]] = {
    "arc_easy": _arc,
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
}


def _load_examples(task: str, *, limit: int | None, seed: int) -> list[_Example]:
    from datasets import load_from_disk

    docs = load_from_disk(str(task_data_path(task)))
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    if limit is not None:
        order = order[:limit]
    return [_FORMATS[task](docs[i]) for i in order]


def _encode_request(tokenizer, context: str, continuation: str, bos: int | None) -> tuple[list[int], int]:
    """Token ids of BOS + context + continuation and the index where the continuation starts.

    As the harness: encode the whole string and take the continuation as what follows the context's
    tokens, so a merge at the seam does not drop characters.
    """
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    n_ctx = min(n_ctx, len(whole) - 1)  # at least one continuation token
    prefix = [] if bos is None else [bos]
    return prefix + whole, len(prefix) + n_ctx


@torch.inference_mode()
def _score(model, requests: Sequence[tuple[list[int], int]], *, batch_size: int, progress: bool, desc: str):
    """Sum of log-probs of each request's continuation tokens (float64 list, in request order)."""
    scores = [0.0] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))  # similar lengths batch well
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False, unit="batch"):
        idx = order[start : start + batch_size]
        width = max(len(requests[i][0]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            seq = requests[i][0]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        # Right padding: real positions never see the pads. Logits only where a continuation is predicted.
        keep = range(min(requests[i][1] for i in idx) - 1, width - 1)
        logits, first = _logits(model, ids, mask, keep=keep)
        for row, i in enumerate(idx):
            seq, cont = requests[i]
            lp = torch.log_softmax(logits[row, cont - 1 - first : len(seq) - 1 - first], dim=-1)
            target = torch.tensor(seq[cont:], device=lp.device)
            scores[i] = lp.gather(-1, target[:, None]).double().sum().item()
    return scores


def zero_shot(
    model,
    tokenizer,
    *,
    tasks: Sequence[str] = KNOWN_TASKS,
    limit: int | None = 100,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict]:
    """Multiple-choice accuracy by log-likelihood on bundled validation splits, offline.

    Per task ``{"acc", "acc_norm", "n"}``: ``acc`` picks the choice with the highest summed log-likelihood
    of its continuation, ``acc_norm`` that sum divided by the choice's length in characters (as
    lm-evaluation-harness). Examples: the first ``limit`` of the split after a shuffle seeded by ``seed``
    (the whole split when ``limit`` is None). BOS is prepended when the tokenizer uses one.
    """
    unknown = [t for t in tasks if t not in _FORMATS]
    if unknown:
        raise UserError(f"unknown zero-shot task(s) {', '.join(unknown)}: choose from {', '.join(KNOWN_TASKS)}")
    if limit is not None and limit < 1:
        raise UserError(f"zero-shot limit {limit} must be at least 1")
    bos = bos_id(tokenizer)
    results: dict[str, dict] = {}
    for task in tasks:
        examples = _load_examples(task, limit=limit, seed=seed)
        requests, owners = [], []
        for e, ex in enumerate(examples):
            for ctx, cont in zip(ex.contexts, ex.continuations, strict=True):
                requests.append(_encode_request(tokenizer, ctx, cont, bos))
                owners.append(e)
        scores = _score(model, requests, batch_size=batch_size, progress=progress, desc=task)
        per_example: list[list[float]] = [[] for _ in examples]
        for e, s in zip(owners, scores, strict=True):
            per_example[e].append(s)
        acc = acc_norm = 0
        for ex, ll in zip(examples, per_example, strict=True):
            acc += max(range(len(ll)), key=ll.__getitem__) == ex.gold
            normed = [s / max(n, 1) for s, n in zip(ll, ex.norm_lengths, strict=True)]
            acc_norm += max(range(len(normed)), key=normed.__getitem__) == ex.gold
        n = len(examples)
        results[task] = {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}
    return results


# ---------------------------------------------------------------------------------------------------------
# Parameter counts


def _decoder_layers(model) -> torch.nn.ModuleList:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None and hasattr(model, "get_decoder"):
        layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.model.layers")
    return layers


def decoder_params(model) -> int:
    """Parameters of the decoder layers (``model.model.layers``): what structural pruning removes."""
    return sum(p.numel() for p in _decoder_layers(model).parameters())


def total_params(model) -> int:
    """All unique parameters; tied weights (embeddings = LM head) count once."""
    return sum(p.numel() for p in model.parameters())
