"""The command line: help for every command, one-line errors with exit 2 and nothing written, and a
prune -> reload -> eval round trip on a tiny model folder."""

import json
import subprocess
import sys

import pytest

from tests.conftest import TINY_SPACE, run_cli, search_args, space_file


def test_installed_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "tyrsearch.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "prune" in result.stdout and "eval" in result.stdout


@pytest.mark.parametrize("command", [[], ["eval"], ["prune"], ["search"]])
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_prune_help_defines_sparsity():
    assert "embeddings and lm_head excluded" in " ".join(run_cli("prune", "--help").stdout.split())


BAD_INPUTS = [
    (["--model", "no/such/folder"], "not found"),
    (["--model", "llama-9000"], "known model aliases: smollm2-135m"),
    (["--criterion", "psychic"], "--criterion 'psychic' is unknown"),
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "0.95"], "would remove every MLP channel"),
    (["--allocation", "lottery"], "--allocation 'lottery' is unknown"),
    (["--calib", "EMPTY"], "empty"),
    (["--calib", "no/such/text.txt"], "not found"),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUTS)
def test_bad_prune_input_is_one_line_exit_2_and_writes_nothing(override, message, tiny_folder, text_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    args = {"--model": str(tiny_folder), "--criterion": "wanda", "--sparsity": "0.3", "--calib": str(text_file),
            "--out": str(tmp_path / "out"), "--calib-seqs": "2", "--seq-len": "16"}
    args.update(dict(zip(override[::2], override[1::2], strict=False)))
    if args["--calib"] == "EMPTY":
        args["--calib"] = str(empty)
    result = run_cli("prune", *[x for kv in args.items() for x in kv])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_or_used_out_dir(tiny_folder, text_file, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    common = ["prune", "--model", str(tiny_folder), "--sparsity", "0.3", "--calib", str(text_file)]
    result = run_cli(*common, "--out", str(used))
    assert result.returncode == 2 and "already exists and is not empty" in result.stderr
    assert (used / "keep.txt").read_text() == "mine"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli(*common, "--out", str(blocker / "sub"))
    assert result.returncode == 2 and "not writable" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_usage_errors_are_one_line_too():
    result = run_cli("prune", "--sparsity", "abc")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_prune_then_eval_round_trip(tiny_folder, text_file, tmp_path):
    out = tmp_path / "pruned"
    result = run_cli("prune", "--model", str(tiny_folder), "--criterion", "osscar", "--sparsity", "0.4",
                     "--allocation", "owl", "--calib", str(text_file), "--calib-seqs", "4", "--seq-len", "32",
                     "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "result.json").read_text())
    assert abs(summary["achieved_sparsity"] - 0.4) < 0.02
    assert summary["decoder_params_after"] < summary["decoder_params_before"]
    assert summary["calibration"]["tokens"] == 4 * 32 and len(summary["layers"]) == 3
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    evaluated = run_cli("eval", "--model", str(out), "--text", str(text_file), "--seq-len", "32",
                        "--max-tokens", "128", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    figures = json.loads(evaluated.stdout)
    assert figures["tokens"] == 4 * 31 and figures["ppl"] > 1 and figures["decoder_params"] == summary[
        "decoder_params_after"]


def test_prune_with_the_knapsack_allocation(tiny_folder, text_file, tmp_path):
    space = tmp_path / "tiny.yaml"
    space.write_text("family: llama\nunits:\n  q_heads: {min_keep: 0, step: 1}\n  mlp: {min_keep: 0, step: 8}\n"
                     "levels: 3\niterations: 1\ngenerations: 1\noffspring: 4\n"
                     "selection:\n  - {survivors: 4, tokens: 64}\nfitness: {metric: kl, top_k: 16}\n")
    out = tmp_path / "knapsack"
    result = run_cli("prune", "--model", str(tiny_folder), "--allocation", "knapsack", "--space", str(space),
                     "--sparsity", "0.3", "--calib", str(text_file), "--calib-seqs", "4", "--seq-len", "32",
                     "--sensitivity-seqs", "1", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["allocation"] == "knapsack" and summary["achieved_sparsity"] >= 0.3  # at least the target
    assert (out / "config.json").exists()


def test_a_bad_search_space_is_exit_2(tiny_folder, text_file, tmp_path):
    result = run_cli("prune", "--model", str(tiny_folder), "--allocation", "knapsack", "--space", "bert",
                     "--sparsity", "0.3", "--calib", str(text_file), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "unknown search space 'bert'" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("override", "message"), [
    (["--target", "1.2"], "--target must be in [0, 1)"),
    (["--strategy", "hillclimb"], "--strategy 'hillclimb' is unknown"),
    (["--start", "middle"], "--start 'middle' is unknown"),
    (["--target", "0.95"], "cannot be reached: the space's min_keep allows removing at most"),
    (["--resume"], "does not exist; run the search without --resume first"),
])
def test_bad_search_input_is_one_line_exit_2_and_writes_nothing(override, message, tiny_folder, text_file, tiny_space,
                                                                 tmp_path):
    result = run_cli(*search_args(tiny_folder, text_file, tiny_space, tmp_path / "out"), *override)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_search_writes_the_winner_result_and_report_and_resumes(tiny_folder, text_file, tiny_space, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*search_args(tiny_folder, text_file, tiny_space, out, "--eval-tokens", "64", "--json"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "result.json").read_text())
    assert abs(summary["achieved_sparsity"] - 0.4) < 0.05 and len(summary["layers"]) == 3
    assert [it["steps"]["mlp"] for it in summary["iterations"]] == [8, 4]  # coarse to fine
    assert 2 < summary["study"]["trials"] <= 2 * (1 + 2 * 4)
    assert list(summary["held_out"]) == ["wiki-summaries", "literature", "code", "docs"]  # every held-out domain
    assert all(r["ppl"] > 1 and r["tokens"] == 2 * 31 for r in summary["held_out"].values())
    assert summary["iterations"][1]["fitness"] <= summary["iterations"][1]["start_fitness"]  # elitist
    report = (out / "report.html").read_text()
    assert "Fitness over generations" in report and report.count("<svg") == 3
    evaluated = run_cli("eval", "--model", str(out / "model"), "--text", str(text_file), "--seq-len", "32",
                        "--max-tokens", "64", "--json")
    assert evaluated.returncode == 0 and json.loads(evaluated.stdout)["decoder_params"] == summary[
        "decoder_params_after"]
    again = run_cli(*search_args(tiny_folder, text_file, tiny_space, out))
    assert again.returncode == 2 and "already exists" in again.stderr
    resumed = run_cli(*search_args(tiny_folder, text_file, tiny_space, out, "--resume", "--json"))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["layers"] == summary["layers"]
    assert json.loads(resumed.stdout)["study"]["trials"] == summary["study"]["trials"]  # nothing evaluated again
    changed = run_cli(*search_args(tiny_folder, text_file, tiny_space, out, "--resume", "--seed", "3"))
    assert changed.returncode == 2 and "other settings (seed)" in changed.stderr


def test_eval_takes_a_named_held_out_domain(tiny_folder):
    result = run_cli("eval", "--model", str(tiny_folder), "--text", "docs", "--seq-len", "32", "--max-tokens", "64",
                     "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == 2 * 31


def test_search_on_a_calibration_mixture_picks_winners_on_held_back_tokens(tiny_folder, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"A quiet {i} garden grows beside the long stone wall." for i in range(400)))
    space = space_file(tmp_path, TINY_SPACE + "validation: {candidates: 2, tokens: 64}\n")
    out = tmp_path / "run"
    args = search_args(tiny_folder, text_file, space, out, "--json")
    args[args.index("--calib") + 1] = f"{text_file},{other}"
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["calibration"]["source"] == f"{text_file},{other}"
    for iteration in summary["iterations"]:
        scores = {v["trial"]: v["validation"] for v in iteration["validation"]}
        assert len(scores) == 2 and scores[iteration["trial"]] == min(scores.values())
    args[args.index("--calib") + 1] = f"{text_file},,{other}"
    args[args.index("--out") + 1] = str(tmp_path / "bad")
    bad = run_cli(*args[:-1])
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "empty part" in bad.stderr
    assert not (tmp_path / "bad").exists()
