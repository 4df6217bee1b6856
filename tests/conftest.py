"""Shared fixtures and helpers: tiny random models of each family, dense and Mixture-of-Experts (fast), the
real SmolLM2 (integration), the meta-pruner's small networks, a character tokenizer and random prose, search
spaces, the CLI in this process, PostgreSQL and a Ray head of the tests' own. Test modules import from here,
never from one another."""

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

import tyrsearch  # noqa: F401  (registers the per-layer-shaped classes)
from tyrsearch.cli import main
from tyrsearch.materialize import save_pruned
from tyrsearch.meta.nets import ResNetConfig, ViTNetConfig, build
from tyrsearch.models import EXPERTS, MLP, Q_HEADS, KeptUnits, adapter_for
from tyrsearch.search.study import GENERATION, INDEX, ITERATION
from tyrsearch.space import Fitness, SearchSpace, Stage, UnitSpace

VOCAB = 96


def tiny_llama(*, vocab: int = VOCAB, layers: int = 3, seed: int = 0, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                         initializer_range=init)
    return LlamaForCausalLM(config).eval()


def tiny_gemma3(*, seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=8,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config).eval()


def tiny_qwen2(*, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=8)
    return Qwen2ForCausalLM(config).eval()


FAMILIES = {"llama": tiny_llama, "gemma3": tiny_gemma3, "qwen2": tiny_qwen2}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    """(name, factory) for each tiny family."""
    return request.param, FAMILIES[request.param]


# ---------------------------------------------------------------------------------------------------------
# Tiny Mixture-of-Experts models

MOE_HIDDEN = 64  # 4 attention heads of 16
# the config fields every tiny MoE family shares; a larger init than transformers' 0.02 so that routing and
# experts visibly change the logits
COMMON = {"vocab_size": VOCAB, "hidden_size": MOE_HIDDEN, "num_attention_heads": 4, "initializer_range": 0.1}


def tiny_mixtral(*, vocab: int = VOCAB) -> MixtralForCausalLM:
    """Softmax over all experts, top-2, renormalised over the two."""
    torch.manual_seed(0)
    config = MixtralConfig(**{**COMMON, "vocab_size": vocab}, intermediate_size=32, num_hidden_layers=2,
                           num_key_value_heads=2,
                           num_local_experts=6, num_experts_per_tok=2)
    return MixtralForCausalLM(config).eval()


def tiny_qwen2_moe(*, vocab: int = VOCAB) -> Qwen2MoeForCausalLM:
    """A shared expert beside the routed ones, top-2 not renormalised, layer 1 a dense MLP."""
    torch.manual_seed(0)
    config = Qwen2MoeConfig(**{**COMMON, "vocab_size": vocab}, intermediate_size=80, moe_intermediate_size=32,
                            shared_expert_intermediate_size=48, num_hidden_layers=3, mlp_only_layers=[1],
                            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    return Qwen2MoeForCausalLM(config).eval()


def tiny_olmoe(*, vocab: int = VOCAB) -> OlmoeForCausalLM:
    """q_norm / k_norm over all heads, top-2 renormalised."""
    torch.manual_seed(0)
    config = OlmoeConfig(**{**COMMON, "vocab_size": vocab}, intermediate_size=32, num_hidden_layers=2, num_experts=8,
                         num_experts_per_tok=2, norm_topk_prob=True, eos_token_id=None)
    return OlmoeForCausalLM(config).eval()


MOE_FAMILIES = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe, "olmoe": tiny_olmoe}


def remove_experts(model, keep: dict[int, list[int]]) -> None:
    """Cut the routed experts of the MoE layers in `keep` (layer index -> expert ids kept), in place."""
    adapter = adapter_for(model)
    for idx, kept in keep.items():
        adapter.prune_layer_(adapter.layers(model)[idx], EXPERTS, KeptUnits(kept=torch.tensor(kept)),
                             layer_idx=idx, head_dim=adapter.head_dim(model))


def reload_without_tyrsearch(models: dict, tokens: torch.Tensor, tmp_path) -> list[list[str]]:
    """Save each model, reload it with trust_remote_code in a fresh interpreter that never imports tyrsearch;
    returns [name, experts implementation, max |logit difference|] per model, in name order."""
    torch.save(tokens, tmp_path / "tokens.pt")
    folders = {}
    for name, model in sorted(models.items()):
        folders[name] = str(save_pruned(model, None, tmp_path / name))
        torch.save(model(tokens).logits, tmp_path / f"{name}.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
tokens = torch.load({str(tmp_path / 'tokens.pt')!r}, weights_only=True)
for name, folder in {folders!r}.items():
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
    expected = torch.load({str(tmp_path)!r} + f"/{{name}}.pt", weights_only=True)
    print(name, m.config._experts_implementation, float((m(tokens).logits - expected).abs().max()))
assert "tyrsearch" not in sys.modules, "tyrsearch was imported"
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return [line.split() for line in out.stdout.strip().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# Token batches and the real SmolLM2


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))


def random_batches(count: int, seed: int) -> torch.Tensor:
    """`count` random sequences of 24 tokens below VOCAB, the same for the same seed."""
    return torch.randint(0, VOCAB, (count, 24), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def smollm2_folder():
    from tyrsearch.assets import resolve_model

    return resolve_model("smollm2-135m")


# ---------------------------------------------------------------------------------------------------------
# The meta-pruner's small vision networks


@pytest.fixture(scope="module")
def one_thread():
    """Networks a few channels wide (the meta-pruner's): intra-op threads cost more in synchronisation than
    they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# the meta-pruner's two families, with irregular widths (as after pruning) so that no two tensors share a
# shape by accident
CONFIGS = {
    "resnet": ResNetConfig(widths=(3, 5, 4), blocks=2, inner=(2, 4, 3, 6, 5, 1)),
    "vit": ViTNetConfig(hidden=12, layers=2, heads=3, mlp=10, layer_heads=(2, 3), layer_mlp=(7, 10)),
}


def random_network(config, *, seed: int = 0) -> torch.nn.Module:
    """A meta-pruner network in float64, every parameter and BatchNorm statistic random, so that a
    misplaced entry shows."""
    torch.manual_seed(seed)
    model = build(config).double()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "running_var" in name:
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():
                tensor.normal_()
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Distillation


@pytest.fixture(scope="module")
def windows():
    """Training windows [32, 32] of random token ids below VOCAB (the distillation and healing tests')."""
    return torch.randint(0, VOCAB, (32, 32), generator=torch.Generator().manual_seed(5))


def kl_to_teacher(student, teacher, tokens: torch.Tensor) -> float:
    """The distillation loss (KL from teacher to student, T = 1) on token ids [n, L]."""
    from tyrsearch.healing import distillation_loss

    with torch.no_grad():
        return distillation_loss(student(tokens).logits, teacher(tokens).logits, 1.0).item()


# ---------------------------------------------------------------------------------------------------------
# Texts and tokenizers


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small plain-text corpus for CLI runs (calibration and evaluation)."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(f"The river {i} flows into the sea near the old town." for i in range(400)))
    return path


CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def char_tokenizer(*, bos: bool = False, dummy_prefix: bool = False) -> PreTrainedTokenizerFast:
    """One token per character (ids < 128); optionally adds BOS, optionally SentencePiece-style '▁'."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS + ["▁"])}
    model = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    split = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if dummy_prefix:  # prepends '▁' to every call, so cutting a text changes its tokens
        model.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="always"), split])
    else:
        model.pre_tokenizer = split
    model.decoder = decoders.Fuse()
    if bos:
        model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def prose(n_paragraphs: int, *, seed: int = 0) -> str:
    """`n_paragraphs` paragraphs of 5 to 39 random words (blank-line separated), the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "pruning", "layer", "head", "x1", "(y)", "z."]
    paras = []
    for _ in range(n_paragraphs):
        idx = torch.randint(0, len(words), (int(torch.randint(5, 40, (1,), generator=gen)),), generator=gen)
        paras.append(" ".join(words[i] for i in idx.tolist()))
    return "\n\n".join(paras)


# ---------------------------------------------------------------------------------------------------------
# Search spaces and the CLI


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_folder):
    """A tiny random Llama with SmolLM2's real tokenizer, saved as an HF folder. Its weights are drawn wider
    than transformers' default (0.1, not 0.02): at 0.02 its next-token distributions are nearly uniform, every
    candidate's KL is ~1e-8, and which one wins is float noise that differs between processes (a search
    resumed in another process found another winner)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_pruned(tiny_llama(vocab=len(tokenizer), init=0.1), tokenizer, folder)
    return folder


TINY_SPACE = ("family: llama\nunits:\n  q_heads: {min_keep: 0, step: 1}\n  mlp: {min_keep: 8, step: 8}\n"
              "levels: 2\niterations: 2\ngenerations: 2\noffspring: 4\n"
              "selection:\n  - {survivors: 4, tokens: 32}\n  - {survivors: 1, tokens: 96}\n"
              "fitness: {metric: kl, top_k: 16}\n")


@pytest.fixture
def tiny_space(tmp_path):
    """A two-iteration search space small enough for a test search of `tiny_folder`."""
    path = tmp_path / "space.yaml"
    path.write_text(TINY_SPACE)
    return path


# TINY_SPACE with three generations and three selection stages: the runner tests' (Optuna workers, Ray)
RUNNER_SPACE = ("family: llama\nunits:\n  q_heads: {min_keep: 0, step: 1}\n  mlp: {min_keep: 8, step: 8}\n"
                "levels: 2\niterations: 2\ngenerations: 3\noffspring: 4\n"
                "selection:\n  - {survivors: 4, tokens: 32}\n  - {survivors: 2, tokens: 64}\n"
                "  - {survivors: 1, tokens: 96}\n"
                "fitness: {metric: kl, top_k: 16}\n")
# a SearchSpace object (not YAML) for the in-process search of tiny_llama / tiny_gemma3: three generations
# of six offspring, three selection stages
SEARCH_SPACE = SearchSpace(family="llama",
                           units={Q_HEADS: UnitSpace(min_keep=0, step=1), MLP: UnitSpace(min_keep=4, step=8)},
                           levels=2, iterations=2, generations=3, offspring=6,
                           selection=(Stage(survivors=6, tokens=24), Stage(survivors=3, tokens=48),
                                      Stage(survivors=1, tokens=96)),
                           fitness=Fitness(top_k=16))


def check_every_place_once(trials):
    """Over a study's trials: each planned (iteration, generation, index) has exactly one trial that counts,
    finished; no candidate of an iteration was evaluated twice."""
    counted = [t for t in trials if t.state != TrialState.FAIL]
    places = [(t.system_attrs[ITERATION], t.system_attrs[GENERATION], t.system_attrs[INDEX]) for t in counted]
    assert len(places) == len(set(places))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted)
    for k in {p[0] for p in places}:
        params = [tuple(sorted(t.params.items())) for t in counted if t.system_attrs[ITERATION] == k]
        assert len(params) == len(set(params))


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> Ran:
    """The CLI's entry point in this process (a subprocess per call would re-import torch each time)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code
    return Ran(code, out.getvalue(), err.getvalue())


def search_args(tiny_folder, text_file, space, out, *extra):
    return ["search", "--model", str(tiny_folder), "--space", str(space), "--target", "0.4", "--calib", str(text_file),
            "--calib-seqs", "4", "--seq-len", "32", "--out", str(out), "--supernet-dir", str(out.parent / "nets"),
            *extra]


def space_file(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------
# Services: PostgreSQL (marker `postgres`) and a Ray head of the tests' own (marker `ray`)

POSTGRES = os.environ.get("TYRSEARCH_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test database; a developer without it gets a skip that says so, CI (CI set) a failure."""
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(POSTGRES).connect():
            pass
    except sqlalchemy.exc.OperationalError as exc:
        reason = f"PostgreSQL at {POSTGRES} is unreachable ({type(exc.orig).__name__}); start it or set " \
                 "TYRSEARCH_TEST_POSTGRES"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return POSTGRES


def processes_mentioning(marker: str) -> list[int]:
    """This machine's processes whose command line mentions `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and marker in (proc / "cmdline").read_text():
                found.append(int(proc.name))
    return found


def stop_processes(marker: str, *, grace_s: float = 5, timeout_s: float = 30) -> None:
    """End the processes that mention `marker` (SIGTERM, then SIGKILL after `grace_s`): only ours, never
    every Ray cluster of the user as `ray stop --force` would."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, timeout_s)):
        for pid in processes_mentioning(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while processes_mentioning(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real Ray head on this machine (2 CPUs, job server on 127.0.0.1), started in a temp dir and, at the
    end, stopped by ending exactly the processes of that temp dir."""
    temp = tmp_path_factory.mktemp("ray")
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [ray, "start", "--head", "--port", "0", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
               "--temp-dir", str(temp), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(port), "--disable-usage-stats"]
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
        yield {"address": (temp / "ray_current_cluster").read_text().strip(), "jobs": f"http://127.0.0.1:{port}"}
    finally:
        stop_processes(str(temp))
        assert not processes_mentioning(str(temp)), "processes of the test's Ray head outlived it"
