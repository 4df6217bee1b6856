"""Devices and dtypes: the choice logic (without a GPU), and bfloat16 end to end on the CPU: every family
prunes, searches, saves and reloads in bf16, and on the real SmolLM2 a bf16 prune keeps what fp32 keeps."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tyrsearch
from tests.conftest import FAMILIES, MOE_FAMILIES, VOCAB, run_cli, tiny_llama
from tyrsearch import data, metrics, texts
from tyrsearch.errors import ParameterError
from tyrsearch.materialize import save_pruned
from tyrsearch.models import MLP, adapter_for
from tyrsearch.moe.stun import StunConfig, stun_prune
from tyrsearch.placement import placement, resolve_device, resolve_dtype
from tyrsearch.pruner import OneShotConfig, one_shot
from tyrsearch.search.driver import Search, SearchConfig, materialize, open_study
from tyrsearch.space import Fitness, SearchSpace, Stage, UnitSpace

GPU = torch.cuda.is_available()


def test_auto_picks_the_cpu_and_float32_without_a_gpu_and_bfloat16_on_cuda():
    if GPU:
        assert placement().device.type == "cuda" and placement().dtype == torch.bfloat16
    else:
        assert placement().to_json() == {"device": "cpu", "dtype": "float32"}
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert placement("cpu", "bfloat16").to_json() == {"device": "cpu", "dtype": "bfloat16"}


@pytest.mark.parametrize(("device", "dtype", "parameter", "words"), [
    ("tpu", "auto", "device", "choose auto, cpu, cuda or cuda:N"),
    ("cuda:x", "auto", "device", "choose auto, cpu, cuda or cuda:N"),
    ("cpu", "int8", "dtype", "choose auto or one of bfloat16, float16, float32"),
])
def test_unknown_settings_name_the_parameter(device, dtype, parameter, words):
    with pytest.raises(ParameterError, match=words) as caught:
        placement(device, dtype)
    assert caught.value.parameter == parameter


@pytest.mark.skipif(GPU, reason="checks the message for a machine without a GPU")
def test_an_unavailable_gpu_is_refused_in_one_line_with_what_to_do():
    with pytest.raises(ParameterError, match="sees no CUDA GPU on this machine; use cpu") as caught:
        resolve_device("cuda")
    assert caught.value.parameter == "device"
    ran = run_cli("eval", "--model", "smollm2-135m", "--device", "cuda:0", "--max-tokens", "64")
    assert ran.returncode == 2 and ran.stderr.startswith("error: --device cuda:0: torch ")
    assert len(ran.stderr.strip().splitlines()) == 1


SPACE = SearchSpace(family="llama", units={MLP: UnitSpace(min_keep=8, step=8)}, levels=2, iterations=1,
                    generations=2, offspring=3, fitness=Fitness(top_k=16),
                    selection=(Stage(survivors=3, tokens=48), Stage(survivors=1, tokens=96)))


def _ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES) + sorted(MOE_FAMILIES))
def test_every_family_prunes_saves_and_reloads_in_bfloat16(family, tmp_path):
    make = {**FAMILIES, **MOE_FAMILIES}[family]
    model = make().to(torch.bfloat16)
    adapter = adapter_for(model)
    dense = adapter.shapes(model)
    if family in MOE_FAMILIES:  # routed experts: STUN's expert stage (its statistics in float64 from bf16)
        stun_prune(model, _ids(4, 0), config=StunConfig(experts_keep=0.75, unstructured="none"))
    else:
        one_shot(model, OneShotConfig(criterion="osscar", sparsity=0.3, attention_sparsity=0.3), _ids(4, 0),
                 progress=False)
    assert adapter.shapes(model) != dense
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    save_pruned(model, None, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert next(again.parameters()).dtype == torch.bfloat16 and adapter.shapes(again) == adapter.shapes(model)
    assert all(torch.equal(t, again.state_dict()[k]) for k, t in model.state_dict().items())  # bf16 bits kept


def test_a_bfloat16_search_keeps_the_budget_and_its_winner_stays_bfloat16(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    config = SearchConfig(target=0.3)
    study = open_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s", space=SPACE, config=config,
                       resume=False)
    search = Search(model=model, calibration=_ids(8, 0), fitness_batches=_ids(4, 1), space=SPACE, config=config,
                    study=study, supernet_dir=tmp_path / "nets", progress=False)
    found = search.run()
    winner = materialize(model, found)
    assert {p.dtype for p in winner.parameters()} == {torch.bfloat16} and found.fitness > 0
    assert all(t.user_attrs["within_budget"] for t in study.trials if t.values)
    shard = next((tmp_path / "nets").glob("*/layer000.mlp.safetensors"))
    from safetensors.torch import load_file

    consumers = [t for name, t in load_file(shard).items() if name.endswith(".consumer")]
    assert consumers and {t.dtype for t in consumers} == {torch.bfloat16}  # shards in the model's dtype


def _kept_channels(dense, pruned) -> list[set[int]]:
    """Per layer, the dense MLP channels a pruned model kept (osscar refits down_proj; gate rows are kept as
    they are, so each kept row is found in the dense gate_proj)."""
    kept = []
    for before, after in zip(dense.model.layers, pruned.model.layers, strict=True):
        weight = after.mlp.gate_proj.weight.detach()  # [K, hidden]
        bits = torch.int16 if weight.dtype == torch.bfloat16 else torch.int32  # rows compared by their bytes
        rows = before.mlp.gate_proj.weight.detach().to(weight.dtype)  # [I, hidden]
        channel = {row.tobytes(): i for i, row in enumerate(rows.view(bits).numpy())}
        kept.append({channel[row.tobytes()] for row in weight.view(bits).numpy()})
    return kept


def test_smollm2_pruned_in_bfloat16_keeps_what_float32_keeps(smollm2_folder):
    dense = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    # 8k calibration tokens: on 2k, near-tied channels swap on the weights' bf16 rounding (95% agree)
    calib = data.calibration_batches(tokenizer, texts.read_text("c4"), seq_len=512, count=16, seed=0)
    held_out = data.eval_batches(tokenizer, texts.read_text("wiki-summaries"), seq_len=512, max_tokens=4096)
    fp32, bf16 = (_first_layers_pruned(dense, dtype, calib, count=4) for dtype in (torch.float32, torch.bfloat16))
    a, b = _kept_channels(dense, fp32), _kept_channels(dense, bf16)
    assert all(len(x) == 1536 for x in a[4:] + b[4:])  # the later layers are whole
    agreement = sum(len(x & y) for x, y in zip(a[:4], b[:4], strict=True)) / sum(map(len, a[:4]))
    assert agreement >= 0.95, agreement
    ppl32 = metrics.perplexity(fp32, held_out, progress=False)["ppl"]
    # the weights bf16 pruning kept and refit, run in float32: this compares the pruning, not bf16 arithmetic
    # (which runs 7x slower on this CPU)
    ppl16 = metrics.perplexity(bf16.float(), held_out, progress=False)["ppl"]
    assert abs(ppl16 / ppl32 - 1) <= 0.03, (ppl32, ppl16)


def _first_layers_pruned(dense, dtype: torch.dtype, calib: torch.Tensor, *, count: int):
    """A copy of `dense` in `dtype` whose first `count` layers are pruned (osscar, 0.3) and the rest kept: the
    whole model would cost 7x more, and its first layers already take every step of the pruning."""
    model = copy.deepcopy(dense).to(dtype)
    layers = model.model.layers
    model.model.layers, model.config.num_hidden_layers = layers[:count], count
    one_shot(model, OneShotConfig(criterion="osscar", sparsity=0.3), calib, progress=False)
    model.model.layers = torch.nn.ModuleList([*model.model.layers, *layers[count:]])
    model.config.num_hidden_layers = len(layers)
    return model


def test_commands_load_in_the_asked_dtype_and_save_in_it(tiny_folder, text_file, tmp_path):
    ran = run_cli("eval", "--model", str(tiny_folder), "--text", str(text_file), "--seq-len", "16",
                  "--max-tokens", "64", "--dtype", "bfloat16", "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["placement"] == {"device": "cpu", "dtype": "bfloat16"}
    pruned = tyrsearch.prune(tiny_folder, sparsity=0.3, calib=str(text_file), calib_seqs=2, seq_len=16,
                             out=tmp_path / "p", dtype="bfloat16", progress=False)
    assert pruned.figures["placement"] == {"device": "cpu", "dtype": "bfloat16"}
    assert json.loads((tmp_path / "p" / "config.json").read_text())["dtype"] == "bfloat16"
    again = tyrsearch.evaluate(tmp_path / "p", text=str(text_file), seq_len=16, max_tokens=64, progress=False)
    assert again.placement == {"device": "cpu", "dtype": "float32"}  # auto on the CPU: float32, whatever was saved
