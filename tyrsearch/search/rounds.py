"""Prune-heal rounds: reach the target in R steps (R = 2 at 0.5: 0.25, then 0.5), each a whole search of the
model the last round left (its own supernet and study) followed by a heal from the original dense model.

Round r removes what takes the original model's budget to `target * r / R`: measured on the model it starts
from, that is 1 - (1 - target * r / R) x dense / start (dense and start: the budget's totals of the original
and of that model). Each round is a search run folder OUT/round-r (study.db, model, model-oneshot,
result.json); OUT/model is the last round's model and OUT/result.json lists every round's figures. A round
that finished is kept when the search is rerun with `resume`; the one that was cut short resumes.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tyrsearch.atomic import atomic_folder, write_json
from tyrsearch.errors import ParameterError, mention
from tyrsearch.results import SearchResult

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tyrsearch.api import ModelRef
    from tyrsearch.search.pipeline import SearchRequest


def round_target(target: float, r: int, rounds: int, *, dense: float, start: float) -> float:
    """The fraction of its own budget (`start`) that round r (1-based) removes from its model."""
    return 1.0 - (1.0 - target * r / rounds) * dense / start


def run_rounds(model: ModelRef, request: SearchRequest, rounds: int, *,
               tokenizer: PreTrainedTokenizerBase | None = None, progress: bool = True) -> SearchResult:
    """`rounds` searches, each healed from the original dense model, to reach `request.target`."""
    import json
    import math

    from tyrsearch import assets
    from tyrsearch.api import load
    from tyrsearch.search.pipeline import run_search

    if not isinstance(model, str | Path):
        raise ParameterError("rounds", "are searched from a model reference (an alias, folder or .gguf file): each "
                                       "round after the first starts from a saved folder")
    if not request.heals:
        raise ParameterError("rounds", f"heal between searches: give {mention('heal_steps')} too")
    if not request.resume and request.out.exists() and any(request.out.iterdir()):
        raise ParameterError("out", f"{request.out} already exists and is not empty; choose a new folder or pass "
                                    f"{mention('resume')}")
    teacher = load(model, tokenizer, device=request.device, dtype=request.dtype)
    base = request.study_name or f"{Path(str(model)).name.removesuffix('.gguf')}-t{request.target:g}"
    figures: list[dict] = []
    start: ModelRef = model
    for r in range(1, rounds + 1):
        folder = request.out / f"round-{r}"
        if (folder / "result.json").is_file():  # finished before an interruption
            figures.append(json.loads((folder / "result.json").read_text()))
        else:
            target = request.target / rounds if r == 1 else round_target(
                request.target, r, rounds, dense=figures[0]["budget"]["dense"], start=figures[-1]["budget"]["winner"])
            step = replace(request, target=target, out=folder, study_name=f"{base}-r{r}", resume=folder.is_dir())
            found = run_search(start, step, tokenizer=tokenizer if r == 1 else None, progress=progress,
                               teacher=teacher.model)
            figures.append(found.figures)
        start = folder / "model"
    with atomic_folder(request.out / "model") as tmp:
        shutil.copytree(start, tmp, dirs_exist_ok=True)
    last = figures[-1]
    summary = {
        "model": teacher.ref, "target": request.target,
        "budget": {"name": request.budget, "dense": figures[0]["budget"]["dense"], "winner": last["budget"]["winner"]},
        "achieved_sparsity": 1.0 - math.prod(1.0 - f["achieved_sparsity"] for f in figures),
        "layers": last["layers"],
        **({"held_out": last["heal"]["held_out"]} if "held_out" in last["heal"] else {}),
        "rounds": figures,
    }
    write_json(request.out / "result.json", summary)
    healed, _ = assets.load_model(str(request.out / "model"))
    return SearchResult(figures=summary, out=request.out, model=healed, tokenizer=teacher.tokenizer)
