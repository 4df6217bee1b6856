"""Deterministic text -> fixed-length token batches (calibration and evaluation).

Every sequence is ``[BOS] + text tokens`` when the tokenizer adds a BOS by default (Gemma needs it),
else only text tokens (SmolLM2's tokenizer adds none). ``text`` may be a string or the LongTensor that
``tokenize`` returned, so one corpus is tokenized once for several uses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from tyrsearch.errors import UserError

# Chunk boundaries: a blank line between two non-space characters. For byte-level BPE (SmolLM2) and
# Gemma's tokenizer a pre-token never spans such a boundary, so the chunks tokenize exactly as the whole.
_BOUNDARY = re.compile(r"(?<=\S)(?=\n\n\S)")
_CHUNK_CHARS = 1 << 16  # large enough to amortise per-call overhead, small enough to parallelise
_PROBES = 16


def _chunks(text: str) -> list[str]:
    chunks: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if match.start() - start >= _CHUNK_CHARS:
            chunks.append(text[start : match.start()])
            start = match.start()
    chunks.append(text[start:])
    return chunks


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # The Rust backend without offsets is about 1.5x faster than the Python wrapper on 1M tokens.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [enc.ids for enc in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _chunking_is_exact(tokenizer, text: str) -> bool:
    """Check on a few real boundaries that split tokenization equals whole tokenization.

    Guards tokenizers that prepend a space to every call (SentencePiece dummy prefix) or merge across
    newlines; those are tokenized whole.
    """
    cuts = [m.start() for m in _BOUNDARY.finditer(text, 0, min(len(text), 1 << 20))][:_PROBES]
    for cut in cuts:
        left, right = text[max(0, cut - 200) : cut], text[cut : cut + 200]
        joined, first, second = _encode(tokenizer, [left + right, left, right])
        if joined != first + second:
            return False
    return True


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole ``text`` without special tokens, as a 1-D LongTensor.

    Long texts are cut at blank lines and tokenized as a batch (the fast tokenizers run a batch in
    parallel) when a probe shows that cutting does not change the tokens; otherwise in one call.
    """
    chunks = _chunks(text)
    if len(chunks) > 1 and _chunking_is_exact(tokenizer, text):
        ids = [i for piece in _encode(tokenizer, chunks) for i in piece]
    else:
        ids = _encode(tokenizer, [text])[0]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer adds it by default (it must then start every sequence), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _tokens(tokenizer, text: str | torch.Tensor) -> torch.Tensor:
    return text if isinstance(text, torch.Tensor) else tokenize(tokenizer, text)


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise UserError(f"sequence length {seq_len} is too short: use at least 2 tokens (e.g. 512)")


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=torch.long), windows], dim=1)


def _body_len(tokenizer, seq_len: int, n_tokens: int) -> tuple[int, int | None]:
    bos = bos_id(tokenizer)
    body = seq_len - (bos is not None)
    if n_tokens < body:
        raise UserError(
            f"the text has {n_tokens} tokens, too few for one sequence of {seq_len} tokens: "
            f"use a longer text or a shorter sequence length"
        )
    return body, bos


def calibration_batches(
    tokenizer, text: str | torch.Tensor, *, seq_len: int, count: int, seed: int = 0
) -> torch.Tensor:
    """``count`` sequences of ``seq_len`` tokens at random offsets of the text: LongTensor [count, seq_len].

    Offsets are drawn uniformly with a ``torch.Generator`` seeded by ``seed``: the same inputs give an
    identical tensor. Windows may overlap.
    """
    _check_seq_len(seq_len)
    if count < 1:
        raise UserError(f"calibration sample count {count} must be at least 1")
    tokens = _tokens(tokenizer, text)
    body, bos = _body_len(tokenizer, seq_len, tokens.numel())
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - body + 1, (count,), generator=gen)
    windows = tokens[starts[:, None] + torch.arange(body)]
    return _with_bos(windows, bos)


def eval_batches(tokenizer, text: str | torch.Tensor, *, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Consecutive non-overlapping sequences from the start of the text: LongTensor [n, seq_len].

    ``n = max(1, max_tokens // seq_len)``, fewer if the text runs out (each sequence counts its BOS).
    """
    _check_seq_len(seq_len)
    tokens = _tokens(tokenizer, text)
    body, bos = _body_len(tokenizer, seq_len, tokens.numel())
    n = min(max(1, max_tokens // seq_len), tokens.numel() // body)
    return _with_bos(tokens[: n * body].view(n, body), bos)


def mixed_batches(
    tokenizer, sources: Sequence[str | torch.Tensor], *, seq_len: int, count: int, seed: int = 0
) -> torch.Tensor:
    """``count`` sequences drawn from the sources in turn: LongTensor [count, seq_len].

    Row i comes from source ``i % len(sources)`` (each source's rows as ``calibration_batches`` draws
    them with ``seed``), so every prefix of the rows (a selection stage's tokens) is balanced across
    sources. One source gives exactly ``calibration_batches``.
    """
    if not sources:
        raise ValueError("mixed_batches needs at least one source")
    n = len(sources)
    parts = [calibration_batches(tokenizer, source, seq_len=seq_len, count=-(-(count - s) // n), seed=seed)
             if s < count else None for s, source in enumerate(sources)]
    return torch.stack([parts[i % n][i // n] for i in range(count)])
