"""`python -m lattice.run` as a user runs it."""
import builtins
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lattice.run import main

from conftest import FIXTURES


def test_twelve_times_twelve_prints_the_answer_both_references_give(smollm2_path):
    # the done-criterion of the foundation issue, exactly as a user types it (default model)
    greedy = json.load(open(os.path.join(FIXTURES, "smollm2_llamacpp.json")))["greedy"]
    want = next(c for c in greedy["cases"] if c["question"] == "What is 12 times 12?")
    assert want["llamacpp"]["ids"][:-1] == want["f32"]["ids"][:len(want["llamacpp"]["ids"]) - 1]
    out = subprocess.run([sys.executable, "-m", "lattice.run", "--prompt", "What is 12 times 12?",
                          "--temp", "0"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want["llamacpp"]["text"]


def test_no_arguments_generates_from_the_default_model(smollm2_path):
    r = CliRunner().invoke(main, ["-n", "8", "-v"])
    assert r.exit_code == 0, r.output
    assert "decode" in r.output and "tok/s" in r.output


def test_raw_prompt_and_sampling_options(smollm2_path):
    args = ["-m", str(smollm2_path), "--raw", "-p", "Once upon a time", "-n", "6", "--temp", "0.8",
            "--top-k", "40", "--top-p", "0.9", "--min-p", "0.05", "--repeat-penalty", "1.1",
            "--seed", "7"]
    a, b = CliRunner().invoke(main, args), CliRunner().invoke(main, args)
    assert a.exit_code == 0, a.output
    assert a.output == b.output and a.output.strip()


def test_chat_mode_keeps_the_conversation(smollm2_path):
    r = CliRunner().invoke(main, ["-m", str(smollm2_path), "--chat", "-n", "6", "-v"],
                           input="Hi!\nAnd again?\n\n")
    assert r.exit_code == 0, r.output
    assert r.output.count(">>> ") == 3
    assert "reused" in r.output


@pytest.mark.parametrize("args, message", [
    (["--temp", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["-m", "/no/such/model.gguf"], "/no/such/model.gguf"),
    (["-m", "definitely-not-an-alias"], "definitely-not-an-alias"),
])
def test_bad_options_are_clear_errors(args, message):
    r = CliRunner().invoke(main, args + ["-n", "1"])
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output


def test_hub_repo_id_without_huggingface_hub_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_hub(name, *a, **k):
        if name.startswith("huggingface_hub"):
            raise ImportError("no module named huggingface_hub")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_hub)
    r = CliRunner().invoke(main, ["-m", "SomeOrg/some-model", "-n", "1"])
    assert r.exit_code != 0 and "huggingface_hub" in r.output
