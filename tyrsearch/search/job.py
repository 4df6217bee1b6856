"""What a worker needs to rebuild a search's inputs on its own: kept in the study (user attr `tyr:job`),
so `tyrsearch worker --storage URL --study NAME` needs nothing else."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tyrsearch import assets, data
from tyrsearch.space import SearchSpace

JOB = "tyr:job"


@dataclass(frozen=True)
class Job:
    model: str  # alias, or an absolute path every worker can read
    calib: str = "c4"
    calib_seqs: int = 32
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 4

    @classmethod
    def of(cls, *, model: str, **fields) -> Job:
        """A job whose model path, if it is one, is absolute (workers run elsewhere)."""
        path = Path(model)
        return cls(model=str(path.resolve()) if path.exists() else model, **fields)

    def to_dict(self) -> dict:
        return asdict(self)

    def load(self, space: SearchSpace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.Tensor, torch.Tensor]:
        """(model, tokenizer, calibration, fitness): what the search process loads, in any process."""
        model, tokenizer = assets.load_model(self.model)
        return model, tokenizer, *self.batches(tokenizer, space)

    def batches(self, tokenizer: PreTrainedTokenizerBase, space: SearchSpace) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibration [calib_seqs, seq_len], fitness [n, seq_len]): the same tokens in every process.
        Fitness sequences are drawn apart from calibration (seed + 1); n covers the last selection stage."""
        tokens = data.tokenize(tokenizer, assets.read_text(self.calib))
        calibration = data.calibration_batches(tokenizer, tokens, seq_len=self.seq_len, count=self.calib_seqs,
                                               seed=self.seed)
        fitness_seqs = -(-space.selection[-1].tokens // self.seq_len)
        fitness = data.calibration_batches(tokenizer, tokens, seq_len=self.seq_len, count=fitness_seqs,
                                           seed=self.seed + 1)
        return calibration, fitness
