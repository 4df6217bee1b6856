"""Distillation (`tyrsearch.healing`, `tyrsearch distill`): the loss is the KL to the teacher, training
brings a moefied student closer and touches only its MLPs, an interrupted run resumes to the same
weights, and the command's output and one-line errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, TrainerCallback

from tests.conftest import VOCAB, kl_to_teacher, run_cli, tiny_llama
from tyrsearch.errors import UserError
from tyrsearch.healing import DistillConfig, distill, distillation_loss
from tyrsearch.local import make_criterion
from tyrsearch.materialize import save_pruned
from tyrsearch.models import LayerShape, adapter_for
from tyrsearch.moe import moefy, save_moe
from tyrsearch.pruner import prune


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(layers=2)


@pytest.fixture(scope="module")
def moe(teacher):
    """A moefied student (4 experts, top-1: far from its teacher); each test trains a copy."""
    calibration = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(3))
    return moefy(teacher, calibration, experts=4, top_k=1, progress=False)


def test_distillation_loss_is_the_mean_kl_from_teacher_to_student():
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p, q = F.softmax(teacher, dim=-1), F.softmax(student, dim=-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, 1.0), expected)
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    hot = distillation_loss(student, teacher, 2.0)
    expected_hot = 4 * (F.softmax(teacher / 2, -1) * (F.log_softmax(teacher / 2, -1) - F.log_softmax(student / 2, -1))
                        ).sum(-1).mean()
    torch.testing.assert_close(hot, expected_hot)


def test_distill_brings_the_student_closer_and_trains_only_its_mlps(teacher, moe, windows, tmp_path):
    student = copy.deepcopy(moe)
    held_out = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(4))
    before = kl_to_teacher(student, teacher, held_out)
    history = distill(teacher, student, windows, tmp_path / "ck", progress=False,
                      config=DistillConfig(steps=20, lr=3e-3, warmup=2, save_every=10))
    assert kl_to_teacher(student, teacher, held_out) < 0.8 * before
    assert [row["step"] for row in history if "loss" in row] == [10, 20]
    after = student.state_dict()
    changed = {name for name, value in after.items() if not torch.equal(value, moe.state_dict()[name])}
    assert changed and all(".mlp." in name for name in changed)
    assert any("experts" in name for name in changed) and any(".gate." in name for name in changed)
    assert not any(p.requires_grad for p in student.parameters())


class _Interrupt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_distillation_resumes_to_the_weights_of_an_uninterrupted_one(
        teacher, moe, windows, tmp_path):
    config = DistillConfig(steps=8, lr=3e-3, warmup=1, save_every=4)
    whole = copy.deepcopy(moe)
    distill(teacher, whole, windows, tmp_path / "whole", config=config, progress=False)

    cut = copy.deepcopy(moe)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, cut, windows, tmp_path / "cut", config=config, progress=False, callbacks=[_Interrupt(6)])
    assert (tmp_path / "cut" / "checkpoint-4").is_dir()
    resumed = copy.deepcopy(moe)  # as a rerun starts: the student as first loaded
    history = distill(teacher, resumed, windows, tmp_path / "cut", config=config, progress=False)
    assert history[-1]["step"] == 8
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


def test_resuming_with_other_settings_is_refused(teacher, moe, windows, tmp_path):
    config = DistillConfig(steps=4, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, copy.deepcopy(moe), windows, tmp_path, config=config, progress=False,
                callbacks=[_Interrupt(3)])
    with pytest.raises(UserError, match=r"other settings \(lr differ\)"):
        distill(teacher, copy.deepcopy(moe), windows, tmp_path, progress=False,
                config=DistillConfig(steps=4, save_every=2, lr=1e-4))


def test_a_student_over_another_vocabulary_is_refused(teacher, windows, tmp_path):
    with pytest.raises(UserError, match="same vocabulary"):
        distill(teacher, tiny_llama(vocab=VOCAB + 1, layers=2), windows, tmp_path, config=DistillConfig())


# ---------------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_folder, text_file):
    """A tiny Llama with SmolLM2's tokenizer, its moefied and its pruned (per-layer shapes) students, and
    a model over another vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    root = tmp_path_factory.mktemp("distill")
    dense = tiny_llama(vocab=len(tokenizer), layers=2)
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    calibration = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(3))
    save_moe(moefy(dense, calibration, experts=4, top_k=1, progress=False), tokenizer, root / "moe")
    pruned = copy.deepcopy(dense)
    plan = [LayerShape(kv_heads=d.kv_heads, q_per_kv=d.q_per_kv, intermediate=d.intermediate // (2 + i))
            for i, d in enumerate(adapter_for(pruned).shapes(pruned))]
    prune(pruned, plan, make_criterion("wanda"), calibration, progress=False)
    save_pruned(pruned, tokenizer, root / "pruned")
    other = tiny_llama(vocab=VOCAB, layers=2)
    other.save_pretrained(root / "other")
    tokenizer.save_pretrained(root / "other")
    return root


def _distill_args(folders, text_file, out, **overrides):
    args = {"--teacher": str(folders / "dense"), "--student": str(folders / "moe"), "--out": str(out),
            "--steps": "4", "--batch-size": "2", "--seq-len": "32", "--save-every": "2", "--text": str(text_file),
            "--eval-text": str(text_file), "--eval-tokens": "1024"}
    args.update(overrides)
    return ["distill", *[x for kv in args.items() for x in kv]]


@pytest.mark.parametrize(("student", "model_type"), [("moe", "mixtral"), ("pruned", "tyr_llama")])
def test_distill_command_saves_a_reloadable_student_and_reports_perplexities(student, model_type, folders, text_file,
                                                                             tmp_path):
    out = tmp_path / "kd"
    result = run_cli(*_distill_args(folders, text_file, out, **{"--student": str(folders / student)}), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "result.json").read_text())
    assert (summary["steps"], summary["train_tokens"]) == (4, 4 * 2 * 32)
    assert [row["step"] for row in summary["loss"]] == [2, 4]
    assert summary["ppl_ratio"] == pytest.approx(summary["student_ppl"] / summary["teacher_ppl"])
    assert not (tmp_path / "kd.checkpoints").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.model_type == model_type and (out / "tokenizer.json").is_file()
    assert [p.shape for p in reloaded.parameters()] == [
        p.shape for p in AutoModelForCausalLM.from_pretrained(folders / student).parameters()]
    evaluated = run_cli("eval", "--model", str(out), "--text", str(text_file), "--seq-len", "32",
                        "--max-tokens", "1024", "--json")  # distill measures at its own --seq-len
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["ppl"] == pytest.approx(summary["student_ppl"], rel=1e-4)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"--student": "no/such/folder"}, "not found"),
    ({"--student": "other"}, "same vocabulary"),
    ({"--text": "no/such/text.txt"}, "not found"),
    ({"--batch-size": "999"}, "fewer than --batch-size 999"),
    ({"--lr": "0"}, "--lr"),
])
def test_bad_distill_input_is_one_line_exit_2_and_writes_nothing(overrides, message, folders, text_file, tmp_path):
    if overrides.get("--student") == "other":
        overrides["--student"] = str(folders / "other")
    result = run_cli(*_distill_args(folders, text_file, tmp_path / "out", **overrides))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()


def test_distill_command_refuses_checkpoints_of_other_settings_before_any_work(folders, text_file, tmp_path):
    checkpoints = tmp_path / "out.checkpoints"
    checkpoints.mkdir()
    (checkpoints / "distill.json").write_text(json.dumps({"lr": 0.5}))
    result = run_cli(*_distill_args(folders, text_file, tmp_path / "out"))
    assert result.returncode == 2 and "other settings" in result.stderr and "pass --overwrite" in result.stderr
    assert json.loads((checkpoints / "distill.json").read_text()) == {"lr": 0.5}
    assert not (tmp_path / "out").exists()
