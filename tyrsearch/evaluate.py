"""Evaluation of any causal LM (dense or with per-layer shapes): perplexity, KL to a reference,
zero-shot multiple choice, parameter counts.

Everything runs under ``torch.inference_mode`` and accumulates in float64; logits are reduced one
sequence at a time so a large vocabulary (Gemma: 262k) does not multiply the memory by the batch size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tyrsearch.assets import task_data_path
from tyrsearch.data import bos_id
from tyrsearch.errors import UserError

KNOWN_TASKS: tuple[str, ...] = ("arc_easy", "piqa", "hellaswag", "winogrande")


def _chunks(batches: torch.Tensor, batch_size: int, *, desc: str, progress: bool) -> Iterator[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, batches.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        yield batches[start : start + batch_size]


def _logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    input_ids = input_ids.to(model.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits.float()


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
        logits = _logits(model, chunk)
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

    ``log_probs`` [n, L-1, k] are log-softmax over the full vocabulary at positions 0..L-2, sorted
    descending; ``indices`` [n, L-1, k] are their token ids, or None when all V tokens are stored
    (then ``log_probs`` is [n, L-1, V] in vocabulary order).
    """

    batches: torch.Tensor
    log_probs: torch.Tensor
    indices: torch.Tensor | None

    @property
    def k(self) -> int | None:
        return None if self.indices is None else self.log_probs.shape[-1]


@torch.inference_mode()
def dense_topk(model, batches: torch.Tensor, *, k: int | None, batch_size: int = 4, progress: bool = True) -> Reference:
    """Run the reference model once and keep its top-``k`` next-token log-probs (all when ``k`` is None;
    that costs n*(L-1)*V floats)."""
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None, got {k}")
    values, indices = [], []
    for chunk in _chunks(batches, batch_size, desc="reference", progress=progress):
        log_probs = torch.log_softmax(_logits(model, chunk)[:, :-1], dim=-1).cpu()
        if k is None:
            values.append(log_probs)
        else:
            top = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
            values.append(top.values)
            indices.append(top.indices)
    return Reference(
        batches=batches,
        log_probs=torch.cat(values),
        indices=torch.cat(indices) if indices else None,
    )


def _kl_full(ref_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(P_ref || P) with full-vocabulary log-probs [T, V]."""
    p = ref_lp.exp()
    terms = torch.where(p > 0, p * (ref_lp - lp), 0.0)  # 0 log 0 = 0, also for -inf logits
    return terms.sum(-1).double().sum()


def _kl_topk(ref_top: torch.Tensor, lp_top: torch.Tensor) -> torch.Tensor:
    """Sum over positions of the KL between the (k+1)-bucket coarse-grainings: the reference's top-k
    tokens plus one bucket for the remaining mass. ``ref_top``/``lp_top`` [T, k] are full-vocabulary
    log-probs of the reference / model at the reference's top-k tokens."""
    ref_top, lp_top = ref_top.double(), lp_top.double()
    p = ref_top.exp()
    head = torch.where(p > 0, p * (ref_top - lp_top), 0.0).sum(-1)
    tiny = torch.finfo(torch.float64).tiny
    # Rest mass 1 - sum(p) via expm1 for precision; clamp: float rounding can push it to or below 0.
    rest_ref = (-torch.expm1(torch.logsumexp(ref_top, -1))).clamp_min(0.0)
    rest = (-torch.expm1(torch.logsumexp(lp_top, -1))).clamp_min(tiny)
    tail = torch.xlogy(rest_ref, rest_ref) - torch.xlogy(rest_ref, rest)
    return (head + tail).sum()


def _reference_chunks(
    reference, batches: torch.Tensor, top_k: int | None, batch_size: int, progress: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yield (input chunk, reference log-probs, reference indices or None) per chunk."""
    if isinstance(reference, Reference):
        if reference.k is not None and top_k is not None and top_k > reference.k:
            raise ValueError(f"top_k={top_k} exceeds the k={reference.k} stored in the reference")
        if reference.k is not None and top_k is None:
            top_k = reference.k  # only the top-k is known: the (k+1)-bucket KL is the best estimate
        start = 0
        for chunk in _chunks(batches, batch_size, desc="KL", progress=progress):
            ref_lp = reference.log_probs[start : start + chunk.shape[0]]
            ref_idx = None if reference.indices is None else reference.indices[start : start + chunk.shape[0]]
            start += chunk.shape[0]
            if top_k is not None:
                if ref_idx is None:
                    top = ref_lp.topk(top_k, dim=-1)
                    ref_lp, ref_idx = top.values, top.indices
                else:
                    ref_lp, ref_idx = ref_lp[..., :top_k], ref_idx[..., :top_k]
            yield chunk, ref_lp, ref_idx
        return
    for chunk in _chunks(batches, batch_size, desc="KL", progress=progress):
        ref_lp = torch.log_softmax(_logits(reference, chunk)[:, :-1], dim=-1)
        if top_k is None:
            yield chunk, ref_lp, None
        else:
            top = ref_lp.topk(top_k, dim=-1)
            yield chunk, top.values, top.indices


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
    inequality) and reaches it as k grows.
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
    for chunk, ref_lp, ref_idx in _reference_chunks(reference, batches, top_k, batch_size, progress):
        logits = _logits(model, chunk)[:, :-1]
        for row in range(chunk.shape[0]):
            lp = torch.log_softmax(logits[row], dim=-1)
            r_lp = ref_lp[row].to(lp.device)
            if ref_idx is None:
                total += _kl_full(r_lp, lp).cpu()
            else:
                total += _kl_topk(r_lp, lp.gather(-1, ref_idx[row].to(lp.device))).cpu()
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
        logits = _logits(model, ids, mask)  # right padding: real positions never see the pads
        for row, i in enumerate(idx):
            seq, cont = requests[i]
            lp = torch.log_softmax(logits[row, cont - 1 : len(seq) - 1], dim=-1)
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
