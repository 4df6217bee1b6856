"""Search spaces: what the global search varies, for one model family, read from YAML.

A space names the unit types searched, how far each may be cut (`min_keep` units per layer, or a
fraction of them; a level `step` in units), the level count L (levels -L..L around a centre), and the
schedule: coarse-to-fine iterations, generations, offspring and the multi-step selection (how many
candidates survive to be evaluated on how many tokens). Every mistake in a YAML file is a one-line UserError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import yaml

from tyrsearch.errors import UserError
from tyrsearch.models import ATTENTION_UNITS, EXPERTS, KV_GROUPS, MLP, Q_HEADS, LayerShape


@dataclass(frozen=True)
class UnitSpace:
    """How one unit type is searched. q_heads count per KV group; 0 kept units removes the block.
    `min_keep` is a count of units, or, below 1, a fraction of each layer's dense units (rounded up)."""

    min_keep: int | float
    step: int

    def floor(self, units: int) -> int:
        """The fewest units a layer with `units` dense units may keep."""
        return math.ceil(self.min_keep * units) if isinstance(self.min_keep, float) else self.min_keep


@dataclass(frozen=True)
class Stage:
    """One step of multi-step selection: the best `survivors` candidates are evaluated on `tokens`."""

    survivors: int
    tokens: int


@dataclass(frozen=True)
class Validation:
    """Final selection on held-back sequences: at the end of every iteration the best `candidates` distinct
    complete trials are scored on `tokens` validation tokens (other sequences than the fitness ones) and
    the best of them is the iteration's winner, so the noise of selecting among hundreds of candidates on
    the fitness tokens does not pick an outlier."""

    candidates: int
    tokens: int


@dataclass(frozen=True)
class Fitness:
    metric: str = "kl"  # kl (to the dense model's next-token distribution) or ppl
    top_k: int = 256  # KL over the dense model's top-k tokens (+ the rest as one bucket)


@dataclass(frozen=True)
class SearchSpace:
    family: str
    units: dict[str, UnitSpace]
    levels: int
    iterations: int
    generations: int
    offspring: int
    selection: tuple[Stage, ...]
    fitness: Fitness
    validation: Validation | None = None  # None: the best fitness wins each iteration

    def check_model(self, shapes: list[LayerShape], unit_types: tuple[str, ...]) -> None:
        """The space must fit the model: prunable unit types, min_keep within every layer's units."""
        for unit, space in self.units.items():
            if unit not in unit_types:
                raise UserError(f"search space unit {unit!r} is not prunable in this model (it has "
                                f"{', '.join(unit_types)}); remove it from the space")
            for i, shape in enumerate(shapes):
                if unit == EXPERTS and not shape.experts:
                    continue  # a dense MLP layer of an MoE model (Qwen2-MoE's mlp_only_layers)
                if space.floor(shape.units(unit)) > shape.units(unit):
                    raise UserError(f"search space: {unit} min_keep {space.min_keep} is above layer {i}'s "
                                    f"{shape.units(unit)} units; lower min_keep")


def _fields(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def _mapping(value, where: str, cls) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"search space: {where} must be a mapping with keys {', '.join(sorted(_fields(cls)))}")
    unknown = set(value) - _fields(cls)
    if unknown:
        raise UserError(f"search space: unknown key {sorted(unknown)[0]!r} in {where}; "
                        f"allowed: {', '.join(sorted(_fields(cls)))}")
    return value


def _positive(value, where: str, *, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"search space: {where} must be an integer >= {minimum}, got {value!r}")
    return value


def _min_keep(value, where: str) -> int | float:
    if isinstance(value, float) and 0 <= value < 1:
        return value
    if isinstance(value, float):
        raise UserError(f"search space: {where} must be a count of units or a fraction in [0, 1), got {value!r}")
    return _positive(value, where, minimum=0)


def parse_space(raw, *, source: str = "<yaml>") -> SearchSpace:
    """A validated SearchSpace from the parsed YAML of `source`."""
    top = _mapping(raw, source, SearchSpace)
    missing = _fields(SearchSpace) - set(top) - {"fitness", "validation"}
    if missing:
        raise UserError(f"search space {source}: missing key {sorted(missing)[0]!r}")
    units_raw = top["units"]
    if not isinstance(units_raw, dict) or not units_raw:
        raise UserError(f"search space {source}: units must map unit types ({KV_GROUPS}, {Q_HEADS}, {MLP}, "
                        f"{EXPERTS}) to {{min_keep, step}}")
    units = {}
    for unit, spec in units_raw.items():
        if unit not in (KV_GROUPS, Q_HEADS, MLP, EXPERTS):
            raise UserError(f"search space {source}: unknown unit type {unit!r}; use {KV_GROUPS}, {Q_HEADS}, {MLP} "
                            f"or {EXPERTS}")
        spec = _mapping(spec, f"units.{unit}", UnitSpace)
        units[unit] = UnitSpace(min_keep=_min_keep(spec.get("min_keep", 0), f"units.{unit}.min_keep"),
                                step=_positive(spec.get("step"), f"units.{unit}.step"))
    if sum(u in ATTENTION_UNITS for u in units) > 1:
        raise UserError(f"search space {source}: choose one attention unit type ({KV_GROUPS} or {Q_HEADS}); "
                        "their variants do not compose")
    if not isinstance(top["selection"], list) or not top["selection"]:
        raise UserError(f"search space {source}: selection must be a list of {{survivors, tokens}} stages")
    stages = []
    for i, raw_stage in enumerate(top["selection"]):
        stage = _mapping(raw_stage, f"selection[{i}]", Stage)
        stages.append(Stage(survivors=_positive(stage.get("survivors"), f"selection[{i}].survivors"),
                            tokens=_positive(stage.get("tokens"), f"selection[{i}].tokens")))
    stages = tuple(stages)
    for before, after in zip(stages, stages[1:], strict=False):
        if after.survivors > before.survivors or after.tokens < before.tokens:
            raise UserError(f"search space {source}: each selection stage must keep fewer or equal survivors "
                            "on more or equal tokens than the one before")
    fitness = Fitness(**_mapping(top.get("fitness", {}), "fitness", Fitness))
    if fitness.metric not in ("kl", "ppl"):
        raise UserError(f"search space {source}: fitness.metric must be kl or ppl, got {fitness.metric!r}")
    validation = None
    if top.get("validation") is not None:
        raw_validation = _mapping(top["validation"], "validation", Validation)
        validation = Validation(candidates=_positive(raw_validation.get("candidates"), "validation.candidates"),
                                tokens=_positive(raw_validation.get("tokens"), "validation.tokens"))
    offspring = _positive(top["offspring"], "offspring")
    if stages[0].survivors > offspring + 1:
        raise UserError(f"search space {source}: the first selection stage keeps {stages[0].survivors} of only "
                        f"{offspring} offspring and the parent")
    return SearchSpace(
        family=str(top["family"]), units=units, levels=_positive(top["levels"], "levels"),
        iterations=_positive(top["iterations"], "iterations"), generations=_positive(top["generations"], "generations"),
        offspring=offspring, selection=stages, fitness=fitness, validation=validation,
    )


def load_space(name_or_path: str) -> SearchSpace:
    """A bundled space by name (`llama`, `gemma3`) or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"search space file {path} not found")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        bundled = resources.files("tyrsearch.search_spaces") / f"{name_or_path}.yaml"
        if not bundled.is_file():
            names = sorted(p.name.removesuffix(".yaml") for p in resources.files("tyrsearch.search_spaces").iterdir()
                           if p.name.endswith(".yaml"))
            raise UserError(f"unknown search space {name_or_path!r}: use one of {', '.join(names)} or a .yaml file")
        text, source = bundled.read_text(encoding="utf-8"), f"{name_or_path}.yaml"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"search space {source} is not valid YAML{where}: fix the file") from None
    return parse_space(raw, source=source)
