"""The meta-pruner end to end through the CLI on a handful of Fashion-MNIST images (zoo -> meta-train ->
prune, ResNet and ViT), the data loader, and its one-line errors (exit 2, nothing written)."""

import json

import pytest
import torch

from tests.conftest import run_cli
from tyrsearch.errors import UserError
from tyrsearch.meta import data
from tyrsearch.meta.nets import flops
from tyrsearch.meta.zoo import load_net, read_zoo

TINY = ["--epochs", "1", "--batch-size", "16", "--train-images", "48", "--test-images", "32", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest


def test_fashion_mnist_loads_as_normalised_tensors():
    train = data.load("train", limit=5)
    test = data.load("test")
    assert train.images.shape == (5, 1, 28, 28) and train.images.dtype == torch.float32
    assert len(test) == 10000 and set(test.labels.tolist()) == set(range(10))
    assert -1 < float(test.images.mean()) < 1 and 0.5 < float(test.images.std()) < 1.5


def test_missing_dataset_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV, str(tmp_path / "empty"))
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        data.load("train")
    out = tmp_path / "zoo"
    result = run_cli("meta", "zoo", "--arch", "resnet", "--count", "1", "--out", str(out), *TINY)
    assert result.returncode == 2 and "apt-get install dataset-fashion-mnist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("command", [["meta"], ["meta", "zoo"], ["meta", "train"], ["meta", "prune"]])
def test_meta_commands_have_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


@pytest.mark.parametrize(("arch", "widths"), [("resnet", "2,3"), ("vit", "4")])
def test_zoo_train_prune_end_to_end(tmp_path, arch, widths):
    zoo_dir, meta_dir = tmp_path / "zoo", tmp_path / "meta"
    zoo = run_cli("meta", "zoo", "--arch", arch, "--count", "3", "--holdout", "1", "--widths", widths,
                  "--out", str(zoo_dir), "--json", *TINY)
    assert zoo.returncode == 0, zoo.stderr
    summary = json.loads(zoo.stdout)
    assert (summary["networks"], summary["train"], summary["test"]) == (3, 2, 1)
    assert [n["split"] for n in read_zoo(zoo_dir)["nets"]] == ["train", "train", "test"]

    trained = run_cli("meta", "train", "--zoo", str(zoo_dir), "--out", str(meta_dir), "--steps", "3",
                      "--batch-size", "8", "--hidden", "8", "--layers", "1", "--train-images", "48", "--quiet",
                      "--json")
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["nets"] == 2 and (meta_dir / "metanet.safetensors").is_file()
    assert json.loads((meta_dir / "meta.json").read_text())["nets"] == ["net-000", "net-001"]

    held_out, pruned_dir = zoo_dir / "net-002", tmp_path / "pruned"
    pruned = run_cli("meta", "prune", "--model", str(held_out), "--meta", str(meta_dir), "--speedup", "2",
                     "--rewrite-steps", "2", "--finetune-steps", "2", "--batch-size", "16", "--train-images", "48",
                     "--test-images", "32", "--out", str(pruned_dir), "--quiet", "--json")
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert report["method"] == "meta" and report["speedup"] >= 2
    assert set(report["test_accuracy"]) == {"dense", "rewritten", "rewritten_finetuned", "pruned", "final"}
    model, config, info = load_net(pruned_dir)
    _, dense_config, _ = load_net(held_out)
    assert flops(dense_config) / flops(config) >= 2 and info["test_accuracy"] == report["test_accuracy"]["final"]
    assert json.loads((pruned_dir / "result.json").read_text()) == report

    # a baseline needs no metanetwork; a pruned network can be pruned again
    again = run_cli("meta", "prune", "--model", str(pruned_dir), "--method", "l2", "--speedup", "1.2",
                    "--rewrite-steps", "0", "--finetune-steps", "1", "--train-images", "16", "--test-images", "16",
                    "--out", str(tmp_path / "again"), "--quiet", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["flops_after"] * 1.2 <= flops(config)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    zoo_dir = tmp_path_factory.mktemp("zoo") / "zoo"
    result = run_cli("meta", "zoo", "--arch", "resnet", "--count", "1", "--widths", "2", "--out", str(zoo_dir), *TINY)
    assert result.returncode == 0, result.stderr
    return zoo_dir


BAD_INPUTS = [
    (["zoo", "--arch", "resnet", "--count", "2", "--widths", "8,x"], "not a comma-separated list"),
    (["zoo", "--arch", "vit", "--count", "2", "--widths", "6"], "not a multiple of its 4 heads"),
    (["zoo", "--arch", "mlp", "--count", "2"], "'mlp' is not one of"),
    (["zoo", "--arch", "resnet", "--count", "2", "--holdout", "2"], "--holdout 2 must leave"),
    (["train", "--zoo", "no/such/zoo"], "not a zoo"),
    (["prune", "--model", "no/such/net", "--method", "l2"], "not a saved network"),
    (["prune", "--model", "ZOO/net-000"], "--method meta needs --meta"),
    (["prune", "--model", "ZOO/net-000", "--method", "l2", "--speedup", "50"], "out of reach"),
    (["prune", "--model", "ZOO/net-000", "--method", "l2", "--speedup", "0.5"], "must be at least 1"),
    (["prune", "--model", "ZOO/net-000", "--meta", "no/such/meta"], "no trained metanetwork"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_zoo, args, message):
    out = tmp_path / "out"
    args = [a.replace("ZOO", str(tiny_zoo)) for a in args]
    result = run_cli("meta", *args, "--out", str(out), "--quiet")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_used_out_folder_is_refused(tmp_path, tiny_zoo):
    out = tmp_path / "meta"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("meta", "train", "--zoo", str(tiny_zoo), "--out", str(out))
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_interrupted_zoo_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "zoo"
    args = ["meta", "zoo", "--arch", "resnet", "--count", "2", "--widths", "2", "--out", str(out), *TINY]
    assert run_cli(*args).returncode == 0
    zoo = json.loads((out / "zoo.json").read_text())
    zoo["nets"] = zoo["nets"][:1]  # as if stopped after the first network
    (out / "zoo.json").write_text(json.dumps(zoo))
    first = (out / "net-000" / "model.safetensors").stat().st_mtime_ns
    assert run_cli(*args).returncode == 2  # a used --out needs --resume
    resumed = run_cli(*args, "--resume", "--json")
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["networks"] == 2
    assert (out / "net-000" / "model.safetensors").stat().st_mtime_ns == first
    other = run_cli("meta", "zoo", "--arch", "resnet", "--count", "3", "--widths", "2", "--out", str(out), *TINY,
                    "--resume")
    assert other.returncode == 2 and "other settings" in other.stderr
