"""What a worker needs to rebuild a search's inputs on its own: kept in the study (user attr `tyr:job`),
so `tyrsearch worker --storage URL --study NAME` needs nothing else."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tyrsearch import assets, data, texts
from tyrsearch.placement import DTYPES, placement
from tyrsearch.space import SearchSpace


@dataclass(frozen=True)
class Job:
    model: str  # alias, or an absolute path every worker can read
    calib: str = texts.DEFAULT_CALIB
    calib_seqs: int = 32
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 4
    dtype: str = "float32"  # the same in every worker (fitness values compare in one precision); devices differ

    @classmethod
    def of(cls, *, model: str, **fields) -> Job:
        """A job whose model path, if it is one, is absolute (workers run elsewhere)."""
        path = Path(model)
        return cls(model=str(path.resolve()) if path.exists() else model, **fields)

    def to_dict(self) -> dict:
        return asdict(self)

    def load(self, space: SearchSpace, *, device: str = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase,
                                                                         Batches]:
        """(model, tokenizer, batches): what the search process loads, in any process, on its `device`."""
        model, tokenizer = assets.load_model(self.model, dtype=DTYPES[self.dtype],
                                             device=placement(device, self.dtype).device)
        return model, tokenizer, self.batches(tokenizer, space)

    def batches(self, tokenizer: PreTrainedTokenizerBase, space: SearchSpace) -> Batches:
        """The same tokens in every process, drawn from the `calib` mixture's sources in turn: calibration
        (seed), fitness (seed + 1, as many as the last selection stage needs) and, where the space has a
        validation stage, held-back validation sequences (seed + 2)."""
        sources = [data.tokenize(tokenizer, texts.read_text(name)) for name in texts.mixture(self.calib)]

        def draw(count: int, seed: int) -> torch.Tensor:
            return data.mixed_batches(tokenizer, sources, seq_len=self.seq_len, count=count, seed=seed)

        validation = None
        if space.validation is not None:
            validation = draw(-(-space.validation.tokens // self.seq_len), self.seed + 2)
        return Batches(calibration=draw(self.calib_seqs, self.seed),
                       fitness=draw(-(-space.selection[-1].tokens // self.seq_len), self.seed + 1),
                       validation=validation)


@dataclass(frozen=True)
class Batches:
    calibration: torch.Tensor  # [calib_seqs, seq_len]: what the supernet is calibrated on
    fitness: torch.Tensor  # [n, seq_len]: the selection stages' tokens (each stage a prefix)
    validation: torch.Tensor | None  # [v, seq_len]: held back for the final choice of each iteration
