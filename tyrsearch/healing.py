"""Healing by knowledge distillation: train a student (a moefied or pruned model) to match its dense teacher.
(The API's `tyrsearch.distill` runs it end to end: loading, the perplexities before and after, saving.)

The loss is KL(teacher || student) of the next-token distributions over the full vocabulary, mean over
positions. Only the student's MLPs (Mixtral experts and routers, or pruned gate/up/down) train by default:
they are what moefy and the pruners changed; attention, norms and embeddings stay the teacher's. With
``method="lora"`` the weights themselves stay frozen and peft's low-rank adapters on those projections train
instead (a fraction of the optimizer memory: what an 8B model needs); they are merged into the weights at the
end, so the student keeps its shapes and saves as before.

transformers' Trainer runs the loop: AdamW with warmup and cosine decay, shuffled windows of the training
text, checkpoints in ``CHECKPOINTS`` every ``save_every`` steps (weights as safetensors; optimizer,
scheduler and RNG state that it reloads with ``torch.load(weights_only=True)``), and resuming from the
last one, with the same data order, after an interruption.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from tyrsearch.atomic import atomic_folder, write_json
from tyrsearch.data import eval_batches
from tyrsearch.errors import ParameterError, UserError, mention

TRAINABLE = ("mlp", "all")
METHODS = ("full", "lora")
HEAL_BATCH, HEAL_SEQ_LEN = 4, 256  # a healing step's windows (`Heal`): 1024 tokens
SETTINGS = "distill.json"  # in the checkpoint folder: the settings a resumed run must share


@dataclass(frozen=True)
class DistillConfig:
    """How the student is trained; a resumed run must use the same settings."""

    steps: int = 500
    batch_size: int = 4
    lr: float = 1e-3
    warmup: int = 20
    temperature: float = 1.0
    train: str = "mlp"  # "mlp": the MLP / MoE blocks only; "all": every student weight
    save_every: int = 50
    seed: int = 0
    method: str = "full"  # "full": the weights train; "lora": low-rank adapters on them, merged at the end
    lora_rank: int = 16  # LoRA's r (alpha = 2r)

    def __post_init__(self) -> None:
        if self.train not in TRAINABLE:
            raise ParameterError("train", f"{self.train!r}: choose one of {', '.join(TRAINABLE)}")
        if self.method not in METHODS:
            raise ParameterError("method", f"{self.method!r}: choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class Heal:
    """Healing after pruning, as `tyrsearch.search` and `tyrsearch.prune` take it (their heal_* parameters):
    ``steps`` of distillation from the dense model on ``text`` (calibration text or a file, never held-out
    text); 0 steps: none."""

    steps: int = 0
    text: str = "c4,wiki"
    lr: float = 1e-4
    train: str = "mlp"
    method: str = "full"
    candidates: int = 0  # search: heal this many of its best candidates briefly, keep the best healed (0: none)
    select_steps: int = 50  # the steps of each brief heal

    def __post_init__(self) -> None:
        from tyrsearch.texts import HELD_OUT_DOMAINS, mixture

        for parameter, value, minimum in (("heal_steps", self.steps, 0), ("heal_candidates", self.candidates, 0),
                                          ("heal_select_steps", self.select_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ParameterError(parameter, f"must be an integer >= {minimum}, got {value!r}")
        if self.candidates and not self.steps:
            raise ParameterError("heal_candidates", f"chooses which candidate to heal: give {mention('heal_steps')} "
                                                    "too")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not self.lr > 0:
            raise ParameterError("heal_lr", f"must be a number > 0, got {self.lr!r}")
        if self.train not in TRAINABLE:
            raise ParameterError("heal_train", f"{self.train!r}: choose one of {', '.join(TRAINABLE)}")
        if self.method not in METHODS:
            raise ParameterError("heal_method", f"{self.method!r}: choose one of {', '.join(METHODS)}")
        if held_out := [name for name in mixture(self.text) if name in HELD_OUT_DOMAINS]:
            raise ParameterError("heal_text", f"{self.text!r} trains on held-out text ({', '.join(held_out)}), which "
                                              "would make its perplexities meaningless: heal on c4, wiki or a file")


def text_windows(tokenizer, sources: dict[str, str], *, seq_len: int, batch_size: int,
                 parameter: str = "text") -> torch.Tensor:
    """All of each text as training windows [n, seq_len] (each text's own, then the next's), at least one
    batch of them (else a ParameterError naming ``parameter``, the texts)."""
    windows = torch.cat([eval_batches(tokenizer, text, seq_len=seq_len, max_tokens=len(text) + seq_len)
                         for text in sources.values()])
    if windows.shape[0] < batch_size:
        raise ParameterError(parameter, f"{','.join(sources)} holds {windows.shape[0]} windows of {seq_len} tokens, "
                                        f"fewer than {mention('batch_size')} {batch_size}: give more text or a "
                                        f"smaller {mention('seq_len')} / {mention('batch_size')}")
    return windows


class _Windows(torch.utils.data.Dataset):
    """Token windows [n, L] as Trainer samples."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index]}


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per position, averaged; logits [b, L, V]. Scaled by T^2 so that the
    gradient's size does not depend on the temperature (Hinton et al.)."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)  # [b*L, V]
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


class _Distiller(Trainer):
    """A Trainer whose loss is the distillation loss to a frozen teacher."""

    def __init__(self, *, teacher: nn.Module, temperature: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.teacher, self.temperature = teacher, temperature
        self.mark: tuple[int, float] | None = None  # (step, time) of the last log, for tokens/s
        self.tokens_per_step = 0

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.mark is not None:  # the progress line and the history show tokens/s
            step, start = self.mark
            now = time.perf_counter()
            logs["tokens_per_s"] = round((self.state.global_step - step) * self.tokens_per_step / (now - start), 1)
            self.mark = (self.state.global_step, now)
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        if self.mark is None:  # this run's first step (a resumed run starts later)
            self.mark, self.tokens_per_step = (self.state.global_step, time.perf_counter()), ids.numel()
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids).logits
        outputs = model(input_ids=ids)
        loss = distillation_loss(outputs.logits, teacher_logits, self.temperature)
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # Trainer loads the checkpoint's tensors by name, but save_pretrained wrote some models (Mixtral:
        # experts.N.w1 ...) in their original layout, so nothing would load; from_pretrained converts back.
        # A LoRA checkpoint holds the adapters alone, which Trainer loads itself.
        model = model or self.model
        if hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict())


def trainable_names(student: nn.Module, train: str) -> list[str]:
    """The student's parameters that ``train`` ("mlp" or "all") lets the optimizer change."""
    names = [name for name, _ in student.named_parameters()]
    return names if train == "all" else [name for name in names if ".mlp." in name]


def lora_targets(student: nn.Module, train: str) -> list[str]:
    """The decoder layers' linear projections whose weights ``train`` selects: where LoRA adapters go (never
    lm_head, which is often tied to the embeddings)."""
    keep = set(trainable_names(student, train))
    return [name for name, module in student.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in name and f"{name}.weight" in keep
            and module.weight.numel() > 0]


def check_trainable(student: nn.Module, train: str, method: str = "full") -> list[str]:
    """The names ``trainable_names`` (or, for LoRA, ``lora_targets``) gives; a ParameterError if none."""
    names = lora_targets(student, train) if method == "lora" else trainable_names(student, train)
    if not names and method == "lora":
        raise ParameterError("method", f"lora finds no linear projections for {mention('train')} {train} in the "
                                       "student's layers (experts stored as fused tensors have none): pass "
                                       f"{mention('method')} full")
    if not names:
        raise ParameterError("train", f"{train} finds no MLP weights (named *.mlp.*) in the student: pass "
                                      f"{mention('train')} all")
    return names


def _trainable(student: nn.Module, config: DistillConfig) -> nn.Module:
    """What Trainer trains: the student with only ``config.train``'s weights unfrozen, or (LoRA) a peft
    model of adapters on them, the student's own weights frozen."""
    names = check_trainable(student, config.train, config.method)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                          target_modules=names)
        return get_peft_model(student, lora)
    keep = set(names)
    for name, param in student.named_parameters():
        param.requires_grad_(name in keep)
    return student


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    """Raise a UserError unless the student predicts over the teacher's vocabulary."""
    vocab_t, vocab_s = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if vocab_t != vocab_s:
        raise UserError(f"the teacher predicts over {vocab_t} tokens and the student over {vocab_s}: distillation "
                        "needs the same vocabulary; pass the dense model the student was made from")


def check_resumable(checkpoints: Path, config: DistillConfig, settings: dict | None = None) -> dict:
    """The run's settings (``settings`` with the config); raise a ParameterError if ``checkpoints`` holds a
    run with other ones (they are the checkpoints of the API's `out`: it names `out` and `overwrite`)."""
    settings = {**(settings or {}), **asdict(config)}
    saved = checkpoints / SETTINGS
    if saved.exists() and (before := json.loads(saved.read_text())) != settings:
        changed = sorted(key for key in settings.keys() | before.keys() if settings.get(key) != before.get(key))
        raise ParameterError("out", f"has checkpoints in {checkpoints} of a distillation with other settings "
                                    f"({', '.join(changed)} differ); rerun with the same settings to resume, or "
                                    f"pass {mention('overwrite')} to start over")
    return settings


def distill(teacher: nn.Module, student: nn.Module, windows: torch.Tensor, checkpoints: str | Path, *,
            config: DistillConfig, settings: dict | None = None, progress: bool = True,
            callbacks: list[TrainerCallback] | None = None, device: torch.device | None = None,
            autocast: torch.dtype = torch.float32) -> list[dict]:
    """Train ``student`` in place towards ``teacher`` on token windows [n, L] for ``config.steps`` steps,
    resuming from the last checkpoint in ``checkpoints`` if there is one. ``settings`` (JSON-able, with
    the config) must equal those of the run that wrote the checkpoints. Returns Trainer's log history
    (the loss every 10 steps, or every checkpoint if more often; printed on stderr as it trains). On
    ``device`` (default: Trainer's choice), the student's float32 master weights trained with ``autocast``
    (bfloat16 / float16: mixed precision)."""
    check_pair(teacher, student)
    checkpoints = Path(checkpoints)
    settings = check_resumable(checkpoints, config, settings)
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(checkpoints / SETTINGS, settings)

    teacher.eval().requires_grad_(False)
    trained = _trainable(student, config)
    args = TrainingArguments(
        output_dir=str(checkpoints), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr, lr_scheduler_type="cosine", warmup_steps=config.warmup, weight_decay=0.0,
        save_strategy="steps", save_steps=config.save_every, save_total_limit=1,
        logging_steps=min(10, config.save_every, config.steps),
        report_to="none", seed=config.seed, data_seed=config.seed, disable_tqdm=not progress,
        dataloader_num_workers=0, remove_unused_columns=False,
        use_cpu=device is not None and device.type == "cpu",
        bf16=autocast == torch.bfloat16, fp16=autocast == torch.float16,
    )
    teacher.to(args.device)  # Trainer moves the student
    trainer = _Distiller(teacher=teacher, temperature=config.temperature, model=trained, args=args,
                         train_dataset=_Windows(windows), callbacks=callbacks)
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs: stdout is the caller's (--json)
        trainer.train(resume_from_checkpoint=get_last_checkpoint(str(checkpoints)))
    if trained is not student:
        trained.merge_and_unload()  # W + (alpha / r) B A into the student's own weights: its shapes unchanged
    student.eval().requires_grad_(False)
    return trainer.state.log_history


def save_student(student: nn.Module, source: str | Path, out_dir: str | Path, *, result: dict) -> Path:
    """Write the trained student to ``out_dir`` atomically: the ``source`` folder's tokenizer and code
    files (a pruned model's modeling file), the student's config and weights, and ``result.json``."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        for path in Path(source).iterdir():
            if path.is_file() and path.suffix not in (".safetensors", ".bin") and path.name != "result.json":
                shutil.copy(path, tmp / path.name)
        student.save_pretrained(tmp)
        (tmp / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return out_dir
