"""Named text sources: held-out domains (real assets), deduplication against calibration, mixtures."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import char_tokenizer, prose
from tyrsearch import assets, data, texts
from tyrsearch.errors import UserError


def test_dedupe_drops_documents_sharing_a_13_word_run_with_the_other_text():
    seen = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    against = texts.shingles(seen)
    kept = "one two three four five six seven eight nine ten eleven twelve elsewhere"  # 12 words in common
    copied = "Before it: ONE two three, four five six seven eight nine ten eleven twelve thirteen."
    assert texts.dedupe([kept, copied, "unrelated words"], against) == [kept, "unrelated words"]
    assert texts.shingles("too few words") == set()


def test_a_mixture_names_each_source_once():
    assert texts.mixture("c4") == ("c4",)
    assert texts.mixture("c4, wiki") == ("c4", "wiki")
    with pytest.raises(UserError, match="empty part"):
        texts.mixture("c4,,wiki")
    with pytest.raises(UserError, match="names a source twice"):
        texts.mixture("c4,c4")


def test_mixed_batches_take_rows_from_each_source_in_turn():
    tok = char_tokenizer()
    a, b, c = (data.tokenize(tok, prose(60, seed=s)) for s in range(3))
    mixed = data.mixed_batches(tok, [a, b, c], seq_len=8, count=7, seed=5)
    assert mixed.shape == (7, 8)
    for source, rows in ((a, [0, 3, 6]), (b, [1, 4]), (c, [2, 5])):
        alone = data.calibration_batches(tok, source, seq_len=8, count=len(rows), seed=5)
        assert torch.equal(mixed[rows], alone)  # each source's rows as it would draw them alone
    assert torch.equal(data.mixed_batches(tok, [a], seq_len=8, count=4, seed=1),
                       data.calibration_batches(tok, a, seq_len=8, count=4, seed=1))
    assert data.mixed_batches(tok, [a, b, c], seq_len=8, count=2, seed=5).shape == (2, 8)  # c gives none


def test_unknown_names_are_read_as_files():
    with pytest.raises(UserError, match="not found: pass a UTF-8 text file or one of the corpora c4, wiki"):
        texts.read_text("poetry")


# ---------------------------------------------------------------------------------------------------------
# real assets (installed packages and this Python's standard library)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.resolve_model("smollm2-135m"))


@pytest.mark.parametrize("name", texts.HELD_OUT_DOMAINS)
def test_held_out_domains_are_long_enough_deterministic_and_share_nothing_with_calibration(name, smollm2_tokenizer):
    text = texts.read_text(name)
    assert text == texts.read_text(name)
    tokens = data.tokenize(smollm2_tokenizer, text)
    assert tokens.numel() >= 32_768
    calibration = texts.shingles(texts.read_text("c4")) | texts.shingles(texts.read_text("wiki"))
    assert not texts.shingles(text) & calibration
    assert texts.SOURCES[name].role == texts.HELD_OUT


def test_dedupe_of_a_held_out_domain_removes_what_calibration_holds(monkeypatch):
    wiki = texts.read_text("wiki").split("\n\n")
    planted = next(p for p in wiki if len(p.split()) > 40)
    raw = texts.SOURCES["docs"].load()
    monkeypatch.setitem(texts.SOURCES, "docs", texts.TextSource("docs", texts.HELD_OUT, "test",
                                                                lambda: raw + "\n\n" + planted))
    assert planted not in texts.read_text("docs") and texts.read_text("docs") == texts.read_text("docs")


@pytest.mark.parametrize("name", ["programming", "technical"])
def test_the_later_calibration_corpora_share_nothing_with_any_held_out_domain(name, smollm2_tokenizer):
    text = texts.read_text(name)
    assert texts.SOURCES[name].role == texts.CALIBRATION
    assert data.tokenize(smollm2_tokenizer, text).numel() >= 65_536
    held_out = set().union(*(texts.shingles(texts.read_text(domain)) for domain in texts.HELD_OUT_DOMAINS))
    assert not texts.shingles(text) & held_out


def test_a_held_out_document_in_later_calibration_text_is_dropped():
    planted = next(p for p in texts.read_text("code").split("\n\n") if len(p.split()) > 40)
    raw = "a calibration document\n\n" + planted + "\n\nanother one"
    assert texts.without_held_out(raw) == "a calibration document\n\nanother one"


def test_a_missing_or_damaged_archive_names_the_download_command(monkeypatch, tmp_path):
    monkeypatch.setattr(texts, "assets_download_dir", lambda: tmp_path)
    texts._held_out.cache_clear()  # an earlier test's literature is kept per process; this one must read the archive
    with pytest.raises(UserError, match="pip download --no-deps --no-binary brotli brotli==1.2.1"):
        texts.read_text("literature")
    (tmp_path / texts.BROTLI_SDIST).write_bytes(b"not a tar archive")
    with pytest.raises(UserError, match="is damaged"):
        texts.read_text("literature")
