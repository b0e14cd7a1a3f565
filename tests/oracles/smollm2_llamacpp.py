"""SmolLM2-135M-Instruct oracle fixtures: llama.cpp's tokenization, greedy answers and teacher-forced
logits, compared with the f32 reference (transformers loading the same GGUF dequantized to f32).

Writes (committed, small):
  tests/fixtures/real_text.txt             the teacher-forcing text (see write_real_text for provenance)
  tests/fixtures/smollm2_llamacpp.json     tokenization, greedy runs of both engines, KL / top-1 numbers
  tests/fixtures/smollm2_f32_teacher.npz   the f32 reference's top-k log-probs per real-text position

Three steps, each in the interpreter that has its engine; they exchange data through WORK_DIR:
  python3 tests/oracles/smollm2_llamacpp.py text                       # real_text.txt (system python 3.11.7)
  $LLAMA_VENV/bin/python tests/oracles/smollm2_llamacpp.py llamacpp    # llama.cpp (build_llama_cpp.sh)
  python3 tests/oracles/smollm2_llamacpp.py f32                        # torch + transformers; writes fixtures
or all three: python3 tests/oracles/smollm2_llamacpp.py all
"""

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
TEXT_PATH = FIXTURES / "real_text.txt"
FIXTURE_PATH = FIXTURES / "smollm2_llamacpp.json"
TEACHER_PATH = FIXTURES / "smollm2_f32_teacher.npz"
GGUF_PATH = Path(os.environ.get(
    "SMOLLM2_GGUF", "/root/.cache/lattice/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"))
LLAMA_VENV = Path(os.environ.get("LLAMA_VENV", "/opt/lattice-peers/llama-venv"))
WORK_DIR = Path(os.environ.get("ORACLE_WORK_DIR", "/tmp/lattice-oracle"))
LLAMACPP_PARTIAL = WORK_DIR / "llamacpp.json"
LLAMACPP_LOGITS = WORK_DIR / "llamacpp_real_text_logits.npy"

N_THREADS = 2
N_VOCAB = 49152
WINDOW = 1024          # teacher-forced windows: consecutive, non-overlapping, each a fresh context
MAX_NEW_TOKENS = 48
TEACHER_TOP_K = 16     # log-probs kept per position in the teacher file
IM_END = "<|im_end|>"
GREEDY_PROMPTS = ["What is 12 times 12?", "What is the capital of France?"]

# Python 3.11.7's pydoc_data.topics: the "Objects, values and types" and "Execution model" chapters
# of the Python Language Reference, as plain text. Checked by hash so a different Python fails loudly.
TEXT_TOPICS = ("objects", "execmodel")
TEXT_SHA256 = "71f9224fc1c908dcb31bec6846ce4ee61640f5235bb2aac7691239ea73e095a9"

TOKENIZE_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces    between  words",
    "   ",
    "tab\tseparated\tvalues\t",
    "line one\nline two\n\nline four\n",
    "\n\n\n",
    "windows\r\nline end",
    "Crème brûlée, über, niño, façade, naïve café",
    "ÀÉÎÕÜ àéîõü ñÑ ß",
    "“curly quotes” ‘single’ — em dash… ellipsis",
    "日本語のテキストです。中文测试。한국어 문장",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "1234567890 3.14159 -42 1,000,000 2026-11-25",
    "I'm sure they'll say it's what we've done, isn't it?",
    "ﬁ ligature, zero\u200bwidth, non\u00a0breaking",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after <|im_end|>",
    "",
]


def write_real_text():
    """Writes real_text.txt from the Python Language Reference text that CPython ships (PSF License,
    which allows redistribution) in Lib/pydoc_data/topics.py."""
    import pydoc_data.topics
    text = "\n\n".join(pydoc_data.topics.topics[name].strip() for name in TEXT_TOPICS) + "\n"
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    if digest != TEXT_SHA256:
        raise SystemExit(f"real text from Python {platform.python_version()} has sha256 {digest}, "
                         f"expected {TEXT_SHA256} (made with Python 3.11.7)")
    TEXT_PATH.write_bytes(data)
    print(f"wrote {TEXT_PATH} ({len(data)} bytes, sha256 {digest})")


def windows_for(n_tokens):
    return [[start, min(start + WINDOW, n_tokens)] for start in range(0, n_tokens, WINDOW)]


def top2_gap(logits):
    top2 = np.partition(logits, -2)[-2:]
    return float(top2[1] - top2[0])


def machine_info():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------- llama.cpp step

def run_llamacpp():
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    settings = dict(n_ctx=WINDOW, n_batch=WINDOW, n_ubatch=512, n_threads=N_THREADS,
                    n_threads_batch=N_THREADS, logits_all=True, flash_attn=False, seed=0)
    llm = Llama(model_path=str(GGUF_PATH), verbose=False, **settings)
    assert llm.n_vocab() == N_VOCAB

    tokenize = {s: llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
                for s in TOKENIZE_STRINGS}

    # The prompt as transformers' apply_chat_template(add_generation_prompt=True) renders the GGUF's
    # own template (llama-cpp-python's Jinja2ChatFormatter mirrors it; the f32 step checks equality).
    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token=IM_END, bos_token="<|im_start|>",
                                    add_generation_prompt=True)
    im_start_id, im_end_id = (single_token(llm, marker) for marker in ("<|im_start|>", IM_END))

    greedy = []
    for question in GREEDY_PROMPTS:
        messages = [{"role": "user", "content": question}]
        prompt = formatter(messages=messages).prompt
        prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        ids, gaps = greedy_decode(llm, prompt_ids, im_end_id)
        # Cross-check with llama-cpp-python's own sampler at temperature 0.
        llm.reset()
        completion = llm.create_completion(prompt_ids, max_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                           top_k=1, stop=[IM_END])["choices"][0]["text"]
        text = llm.detokenize([t for t in ids if t != im_end_id]).decode("utf-8", errors="replace")
        if completion != text:
            raise SystemExit(f"greedy loop {text!r} != create_completion {completion!r}")
        greedy.append({
            "question": question,
            "messages": messages,
            "prompt": prompt,
            "prompt_builtin_chatml": builtin_chatml(llm, messages),
            "prompt_ids": prompt_ids,
            "llamacpp": {"ids": ids, "text": text, "top2_gap": gaps,
                         "stop": "eos" if ids[-1] == im_end_id else "length"},
        })

    text_ids = llm.tokenize(TEXT_PATH.read_bytes(), add_bos=False, special=False)
    windows = windows_for(len(text_ids))
    logits = np.lib.format.open_memmap(LLAMACPP_LOGITS, mode="w+", dtype=np.float32,
                                       shape=(len(text_ids), N_VOCAB))
    for start, end in windows:
        llm.reset()
        llm.eval(text_ids[start:end])
        logits[start:end] = llm.scores[: end - start]
    logits.flush()

    partial = {
        "llamacpp": {
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "build_cmake_args": "-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF "
                                "-DGGML_BLAS=OFF -DLLAMA_CURL=OFF (tests/oracles/build_llama_cpp.sh)",
            "settings": settings,
        },
        "im_start_id": im_start_id,
        "im_end_id": im_end_id,
        "tokenize": tokenize,
        "greedy": greedy,
        "text_ids": text_ids,
        "windows": windows,
    }
    LLAMACPP_PARTIAL.write_text(json.dumps(partial, ensure_ascii=False))
    print(f"wrote {LLAMACPP_PARTIAL} and {LLAMACPP_LOGITS} ({len(text_ids)} text tokens)")


def single_token(llm, text):
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    if len(ids) != 1:
        raise SystemExit(f"{text!r} is not a single token: {ids}")
    return ids[0]


def greedy_decode(llm, prompt_ids, stop_id):
    """Argmax decoding one token per llama_decode call, like llama.cpp's generation loop."""
    llm.reset()
    llm.eval(prompt_ids)
    ids, gaps = [], []
    for _ in range(MAX_NEW_TOKENS):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        token = int(np.argmax(row))
        ids.append(token)
        gaps.append(top2_gap(row))
        if token == stop_id:
            break
        llm.eval([token])
    return ids, gaps


def builtin_chatml(llm, messages):
    """llama.cpp's C++ chat-template engine (what llama-cli uses without --jinja) for the same chat."""
    import ctypes
    import llama_cpp
    template = llm.metadata["tokenizer.chat_template"].encode()
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(keep))(
        *[llama_cpp.llama_chat_message(role=r, content=c) for r, c in keep])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(template, chat, len(keep), True, buf, len(buf))
    if n < 0 or n > len(buf):
        raise SystemExit(f"llama_chat_apply_template failed ({n})")
    return buf.raw[:n].decode("utf-8")


# ---------------------------------------------------------------------------------------- f32 step

def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def coarse_kl(teacher_ids, teacher_logp, student_logp):
    """KL(p || q) over the teacher's top-k tokens plus one bucket for the rest of the vocabulary: what
    a test can compute from the teacher file alone (a lower bound of the full KL)."""
    p = np.exp(teacher_logp.astype(np.float64))
    q_logp = np.take_along_axis(student_logp, teacher_ids.astype(np.int64), axis=-1)
    p_tail = np.clip(1.0 - p.sum(-1), 1e-30, None)
    q_tail = np.clip(1.0 - np.exp(q_logp).sum(-1), 1e-30, None)
    return (p * (teacher_logp - q_logp)).sum(-1) + p_tail * (np.log(p_tail) - np.log(q_tail))


def run_f32():
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(N_THREADS)
    partial = json.loads(LLAMACPP_PARTIAL.read_text())
    llama_logits = np.load(LLAMACPP_LOGITS, mmap_mode="r")

    folder, name = str(GGUF_PATH.parent), GGUF_PATH.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    tokenize_hf_differs = {}
    for s, ids in partial["tokenize"].items():
        hf_ids = tokenizer(s, add_special_tokens=False).input_ids
        if hf_ids != ids:
            tokenize_hf_differs[s] = hf_ids

    im_end_id = partial["im_end_id"]
    for run in partial["greedy"]:
        rendered = tokenizer.apply_chat_template(run["messages"], tokenize=False,
                                                 add_generation_prompt=True)
        if rendered != run["prompt"]:
            raise SystemExit(f"chat template renders differ: {rendered!r} vs {run['prompt']!r}")
        prompt = torch.tensor([run["prompt_ids"]])
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 eos_token_id=im_end_id, pad_token_id=im_end_id,
                                 output_logits=True, return_dict_in_generate=True)
        ids = out.sequences[0, prompt.shape[1]:].tolist()
        gaps = [top2_gap(step[0].numpy()) for step in out.logits]
        run["f32"] = {"ids": ids, "text": tokenizer.decode([t for t in ids if t != im_end_id]),
                      "top2_gap": gaps, "stop": "eos" if ids[-1] == im_end_id else "length"}

    text_ids = partial["text_ids"]
    windows = partial["windows"]
    kl, coarse, top1_f32, top1_llama = [], [], [], []
    teacher_ids, teacher_logp = [], []
    for start, end in windows:
        with torch.no_grad():
            f32 = model(torch.tensor([text_ids[start:end]])).logits[0].numpy()
        p_logp = log_softmax(f32)
        q_logp = log_softmax(np.asarray(llama_logits[start:end]))
        kl.append((np.exp(p_logp) * (p_logp - q_logp)).sum(-1))
        ids = np.argsort(-p_logp, axis=-1)[:, :TEACHER_TOP_K]
        logp = np.take_along_axis(p_logp, ids, axis=-1)
        coarse.append(coarse_kl(ids, logp.astype(np.float32), q_logp))
        teacher_ids.append(ids.astype(np.uint16))
        teacher_logp.append(logp.astype(np.float32))
        top1_f32.append(ids[:, 0])
        top1_llama.append(q_logp.argmax(-1))
    kl = np.concatenate(kl)
    coarse = np.concatenate(coarse)
    top1_f32 = np.concatenate(top1_f32)
    top1_llama = np.concatenate(top1_llama)
    np.savez_compressed(TEACHER_PATH, ids=np.concatenate(teacher_ids),
                        logp=np.concatenate(teacher_logp))

    fixture = {
        "model": {"file": GGUF_PATH.name, "sha256": sha256_of(GGUF_PATH), "n_vocab": N_VOCAB},
        "machine": machine_info(),
        "engines": {
            **partial["llamacpp"],
            "f32_reference": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "how": "AutoModelForCausalLM.from_pretrained(folder, gguf_file=..., "
                                     "dtype=torch.float32): the GGUF dequantized to f32"},
        },
        "commands": [
            "bash tests/oracles/build_llama_cpp.sh",
            "python3 tests/oracles/smollm2_llamacpp.py all",
        ],
        "tokenize": {
            "how": "llm.tokenize(s.encode(), add_bos=False, special=True)",
            "cases": partial["tokenize"],
            "hf_gguf_tokenizer_differs": tokenize_hf_differs,
        },
        "greedy": {
            "how": "argmax of the logits, one decode call per token, at most "
                   f"{MAX_NEW_TOKENS} new tokens, stop at {IM_END} (included in ids when produced); "
                   "top2_gap[i] = top-1 minus top-2 logit at the step that produced ids[i]. prompt = "
                   "the GGUF's chat template rendered like transformers' apply_chat_template("
                   "add_generation_prompt=True), which adds the template's default system message; "
                   "prompt_builtin_chatml is llama.cpp's C++ template engine for comparison only",
            "im_start_id": partial["im_start_id"],
            "im_end_id": im_end_id,
            "cases": partial["greedy"],
        },
        "teacher_forced": {
            "text": "tests/fixtures/real_text.txt",
            "text_sha256": TEXT_SHA256,
            "how": "text tokenized with add_bos=False, special=False; each window is a fresh context "
                   "(positions restart at 0, no BOS); logits at every position of every window",
            "text_ids": text_ids,
            "n_tokens": len(text_ids),
            "windows": windows,
            "kl_f32_llamacpp_mean": float(kl.mean()),
            "kl_f32_llamacpp_max": float(kl.max()),
            "kl_f32_llamacpp_mean_per_window": [float(kl[s:e].mean()) for s, e in windows],
            "top1_agreement_llamacpp": float((top1_f32 == top1_llama).mean()),
            "f32_top1_ids": top1_f32.tolist(),
            "teacher_file": TEACHER_PATH.name,
            "teacher_top_k": TEACHER_TOP_K,
            "coarse_kl_f32_llamacpp_mean": float(coarse.mean()),
            "coarse_kl_how": "teacher file: ids (uint16) and f32 log-probs (float32) of the f32 "
                             f"reference's top-{TEACHER_TOP_K} tokens per position. coarse KL = "
                             "sum over those tokens p*(log p - log q) + p_rest*(log p_rest - log q_rest), "
                             "rest = 1 - their summed probability; q = the tested engine's softmax. "
                             "Compare an engine's coarse KL with coarse_kl_f32_llamacpp_mean.",
        },
    }
    FIXTURE_PATH.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {FIXTURE_PATH} ({FIXTURE_PATH.stat().st_size} bytes) and {TEACHER_PATH} "
          f"({TEACHER_PATH.stat().st_size} bytes)")
    print(f"mean KL {kl.mean():.5f}, coarse {coarse.mean():.5f}, "
          f"top-1 agreement {(top1_f32 == top1_llama).mean():.4f} over {len(text_ids)} tokens")
    for run in partial["greedy"]:
        print(run["question"], "| llama.cpp:", repr(run["llamacpp"]["text"]), "| f32:", repr(run["f32"]["text"]))


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_all():
    script = str(Path(__file__).resolve())
    subprocess.run([sys.executable, script, "text"], check=True)
    subprocess.run([str(LLAMA_VENV / "bin" / "python"), script, "llamacpp"], check=True)
    subprocess.run([sys.executable, script, "f32"], check=True)


if __name__ == "__main__":
    steps = {"text": write_real_text, "llamacpp": run_llamacpp, "f32": run_f32, "all": run_all}
    if len(sys.argv) != 2 or sys.argv[1] not in steps:
        raise SystemExit(f"usage: {sys.argv[0]} {{{'|'.join(steps)}}}")
    steps[sys.argv[1]]()
