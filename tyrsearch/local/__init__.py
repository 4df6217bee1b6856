"""Local pruning criteria, chosen by name: for one layer and unit type, which units to keep."""

from tyrsearch.errors import ParameterError
from tyrsearch.local.base import Criterion, ScoreCriterion, top_per_block
from tyrsearch.local.flap import Flap
from tyrsearch.local.magnitude import Magnitude
from tyrsearch.local.osscar import Osscar
from tyrsearch.local.random import Random
from tyrsearch.local.stun import Stun
from tyrsearch.local.taylor import Taylor
from tyrsearch.local.wanda import Wanda

CRITERIA: dict[str, type[Criterion]] = {
    cls.name: cls for cls in (Osscar, Flap, Wanda, Taylor, Magnitude, Random, Stun)
}


def make_criterion(name: str, *, seed: int = 0) -> Criterion:
    """The criterion called `name` (random is seeded with `seed`)."""
    if name not in CRITERIA:
        raise ParameterError("criterion", f"{name!r} is unknown: choose one of {', '.join(CRITERIA)}")
    return Random(seed=seed) if name == Random.name else CRITERIA[name]()


__all__ = ["CRITERIA", "Criterion", "ScoreCriterion", "make_criterion", "top_per_block"]
