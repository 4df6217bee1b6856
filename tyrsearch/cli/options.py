"""What every command shares: the options written once, the parameter-to-flag map, and printing a result."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

MODEL_HELP = "a local HF folder, a .gguf file, or an alias (smollm2-135m, gemma3-270m)"
TEXT_HELP = ("a named text (calibration: c4, wiki; held-out: wiki-summaries, literature, code, docs) or a UTF-8 "
             "text file")
CALIB_HELP = f"{TEXT_HELP}; several joined by commas (c4,wiki) take sequences from each in turn"
STORAGE_HELP = "Optuna storage URL of the study, also from $OPTUNA_STORAGE (e.g. postgresql://USER@HOST/DB)"
JOBS_ADDRESS_HELP = ("the Ray cluster's job server, http://HOST:8265 (its dashboard), also from "
                     "$RAY_API_SERVER_ADDRESS or $RAY_ADDRESS")
HELD_OUT = "wiki-summaries,literature,code,docs"

# API parameters whose flag is not --the-parameter-name
FLAGS = {"study_name": "--study", "zero_shot": "--zero-shot", "tokenizer": "--model"}

Decorator = Callable[[Callable], Callable]


def flag_of(parameter: str) -> str:
    """The flag that sets an API parameter: one place for the whole CLI."""
    return FLAGS.get(parameter, "--" + parameter.replace("_", "-"))


def emit(result: dict, as_json: bool) -> None:
    """One JSON object on stdout with --json; otherwise its scalar figures, one per line."""
    if as_json:
        click.echo(json.dumps(result))
    else:
        for key, value in result.items():
            if not isinstance(value, list | dict):
                click.echo(f"{key}: {value}")


def _stack(*decorators: Decorator) -> Decorator:
    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def model(help: str = MODEL_HELP, *, name: str = "model") -> Decorator:
    return click.option(f"--{name}", f"{name}_ref", required=True, help=help)


def as_json(help: str = "print one JSON object on stdout") -> Decorator:
    return click.option("--json", "as_json", is_flag=True, help=help)


def out_dir(help: str) -> Decorator:
    return click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help=help)


def overwrite(help: str = "replace --out if it exists") -> Decorator:
    return click.option("--overwrite", is_flag=True, help=help)


def seed(help: str | None = None) -> Decorator:
    return click.option("--seed", default=0, show_default=True, type=int, help=help)


def seq_len(default: int = 512, help: str | None = None) -> Decorator:
    return click.option("--seq-len", default=default, show_default=True, type=click.IntRange(min=2), help=help)


def calibration(*, seqs: int, default: str = "c4,wiki", seqs_help: str = "calibration sequences of --seq-len "
                "tokens") -> Decorator:
    """--calib, --calib-seqs and --seq-len."""
    return _stack(click.option("--calib", "calib", default=default, show_default=True, help=CALIB_HELP),
                  click.option("--calib-seqs", default=seqs, show_default=True, type=click.IntRange(min=1),
                               help=seqs_help),
                  seq_len())


def held_out(*, tokens: int, several: bool = True) -> Decorator:
    """--eval-text and --eval-tokens: the held-out perplexity a command measures after its work."""
    text_help = (f"held-out texts, joined by commas: {TEXT_HELP}" if several else f"held-out text: {TEXT_HELP}")
    return _stack(click.option("--eval-text", default=HELD_OUT if several else "wiki-summaries", show_default=True,
                               help=text_help),
                  click.option("--eval-tokens", default=tokens, show_default=True, type=click.IntRange(min=0),
                               help="tokens of each --eval-text on which perplexity is measured (0: skip)"))


def placement(*, what: str = "the model") -> Decorator:
    """--device and --dtype: where a command runs `what`, and in what precision."""
    return _stack(click.option("--device", default="auto", show_default=True,
                               help=f"where {what} runs: auto (a CUDA GPU when there is one, else the CPU), cpu, "
                                    "cuda, cuda:N"),
                  click.option("--dtype", default="auto", show_default=True,
                               help="weights and forward passes: auto (bfloat16 on a GPU, float32 on the CPU), "
                                    "bfloat16, float16, float32; statistics and solves stay in float64"))


def heal() -> Decorator:
    """--heal-steps, --heal-text, --heal-lr, --heal-train, --heal-method: distillation after pruning."""
    return _stack(
        click.option("--heal-steps", default=0, show_default=True, type=click.IntRange(min=0),
                     help="heal the pruned model: optimizer steps of distillation from the dense model (4 windows "
                          "of 256 tokens each; 0: no healing); the model before it is kept beside (-oneshot)"),
        click.option("--heal-text", default="c4,wiki", show_default=True,
                     help="healing text: calibration corpora (c4, wiki) or a UTF-8 text file, several joined by "
                          "commas; never held-out text"),
        click.option("--heal-lr", default=1e-4, show_default=True, type=float,
                     help="healing's peak learning rate (AdamW, warmup, cosine decay)"),
        click.option("--heal-train", default="mlp", show_default=True, type=click.Choice(["mlp", "all"]),
                     help="mlp: the MLP weights train; all: every weight"),
        click.option("--heal-method", default="full", show_default=True, type=click.Choice(["full", "lora"]),
                     help="full: the weights themselves train; lora: LoRA adapters (peft) merged in at the end"))


def storage(*, required: bool, help: str = STORAGE_HELP) -> Decorator:
    return click.option("--storage", envvar="OPTUNA_STORAGE", required=required, default=None, help=help)


def study(*, required: bool, help: str = "the search's study name") -> Decorator:
    return click.option("--study", "--study-name", "study_name", required=required, default=None, help=help)


def jobs_address() -> Decorator:
    return click.option("--address", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"], required=True,
                        help=JOBS_ADDRESS_HELP)


def wait(help: str = "wait for the job to finish; exit 1 unless it succeeds") -> Decorator:
    return click.option("--wait", is_flag=True, help=help)


def quiet(help: str = "no progress bars") -> Decorator:
    return click.option("--quiet", is_flag=True, help=help)


def images(*, train: str, test: str) -> Decorator:
    """--train-images and --test-images: the meta-pruner's Fashion-MNIST subsets."""
    return _stack(click.option("--train-images", default=None, type=click.IntRange(min=1), help=train),
                  click.option("--test-images", default=None, type=click.IntRange(min=1), help=test))
