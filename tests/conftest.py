"""Shared fixtures and helpers: tiny random models of each family (fast), the real SmolLM2 (integration), the
CLI in this process, PostgreSQL and a Ray head of the tests' own."""

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
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import tyrsearch  # noqa: F401  (registers the per-layer-shaped classes)
from tyrsearch.cli import main

VOCAB = 96


def tiny_llama(*, vocab: int = VOCAB, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
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


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2_folder():
    from tyrsearch.assets import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def one_thread():
    """Networks a few channels wide (the meta-pruner's): intra-op threads cost more in synchronisation than
    they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small plain-text corpus for CLI runs (calibration and evaluation)."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(f"The river {i} flows into the sea near the old town." for i in range(400)))
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_folder):
    """A tiny random Llama with SmolLM2's real tokenizer, saved as an HF folder."""
    from transformers import AutoTokenizer

    from tyrsearch.materialize import save_pruned

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_pruned(tiny_llama(vocab=len(tokenizer)), tokenizer, folder)
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


def stop_processes(marker: str, *, timeout_s: float = 30) -> None:
    """End the processes that mention `marker` (SIGTERM, then SIGKILL): only ours, never every Ray cluster
    of the user as `ray stop --force` would."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_mentioning(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
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
