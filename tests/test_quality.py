"""SmolLM2 over ~3,300 tokens of real text, teacher-forced: Lattice's logits must stay at least as
close to the f32 reference (transformers on the dequantized GGUF) as llama.cpp's are.

The f32 reference's top-16 log-probs per position are in a fixture (tests/oracles/
smollm2_llamacpp.py); "coarse KL" = KL over those 16 tokens plus one bucket for the rest."""
import json
import os

import numpy as np
import pytest

import lattice

from conftest import FIXTURES


def coarse_kl(teacher_ids, teacher_logp, logits):
    z = logits - logits.max(axis=1, keepdims=True)
    logq = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    lq = np.take_along_axis(logq, teacher_ids.astype(np.int64), axis=1)
    p = np.exp(teacher_logp.astype(np.float64))
    p_rest = np.clip(1 - p.sum(1), 1e-12, 1)
    q_rest = np.clip(1 - np.exp(lq.astype(np.float64)).sum(1), 1e-12, 1)
    kl = (p * (teacher_logp - lq)).sum(1) + p_rest * (np.log(p_rest) - np.log(q_rest))
    return kl


@pytest.fixture(scope="module")
def oracle():
    tf = json.load(open(os.path.join(FIXTURES, "smollm2_llamacpp.json")))["teacher_forced"]
    teacher = np.load(os.path.join(FIXTURES, tf["teacher_file"]))
    return tf, teacher


@pytest.mark.parametrize("quant", [None, "q8"])
def test_cpu_logits_at_least_as_close_to_f32_as_llamacpp(smollm2_path, oracle, quant):
    tf, teacher = oracle
    model = lattice.load(str(smollm2_path), backend="cpu", quant=quant, context=1024)
    tok = model.tokenizer
    text = open(os.path.join(FIXTURES, "real_text.txt"), encoding="utf-8").read()
    ids = tok.encode(text, add_bos=False)
    assert len(ids) == tf["n_tokens"]
    s = model.session()
    kl, top1 = [], []
    for start, end in tf["windows"]:
        logits = s.logits(ids[start:end])
        kl.append(coarse_kl(teacher["ids"][start:end], teacher["logp"][start:end], logits))
        top1.append(logits.argmax(1) == np.asarray(tf["f32_top1_ids"][start:end]))
    kl, top1 = float(np.concatenate(kl).mean()), float(np.concatenate(top1).mean())
    print(f"\nSmolLM2 Q4_1 quant={quant}: coarse KL {kl:.5f} (llama.cpp "
          f"{tf['coarse_kl_f32_llamacpp_mean']:.5f}), top-1 {top1:.4f} (llama.cpp "
          f"{tf['top1_agreement_llamacpp']:.4f})")
    assert kl <= tf["coarse_kl_f32_llamacpp_mean"]
    assert top1 >= tf["top1_agreement_llamacpp"]
