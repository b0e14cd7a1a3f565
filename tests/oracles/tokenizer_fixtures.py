"""Make the tokenizer and chat-template fixtures under tests/fixtures/tokenizer/.

Needs tokenizers, sentencepiece, gguf and transformers (made with tokenizers 0.23.3, sentencepiece 0.2.3,
transformers 5.24), and llama.cpp's tokenizer test vectors, which ship in the llama-cpp-python sdist:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    LLAMA_CPP=llama_cpp_python-0.3.36/vendor/llama.cpp python3 tests/oracles/tokenizer_fixtures.py

Writes:
  llamacpp_vocab_slices.json.gz  for several of llama.cpp's test vocabularies (models/ggml-vocab-*.gguf):
      the strings of its test (.inp) with the ids it expects (.out: what Hugging Face's tokenizer gives and
      llama.cpp's test-tokenizer-0 checks), and a slice of the vocabulary: every token that is a substring
      of some test string, every byte/special token, and the merges among them, at their original ids.
      BPE and SentencePiece-BPE tokenize a string using only vocabulary entries that are substrings of it,
      so the slice (absent ids filled with placeholders) tokenizes the test strings like the full vocabulary.
  tiny-bpe/      tokenizer.json (byte-level BPE trained here on a few sentences, BOS added by its
                 post-processor), tokenizer_config.json (named chat templates), generation_config.json
  tiny-bpe_expected.json   transformers' ids, decodes and chat rendering for that folder
  tiny-spm/      tokenizer.model (sentencepiece BPE with byte fallback, trained here), tokenizer_config.json
  tiny-spm_expected.json   sentencepiece's own ids for plain strings; for strings with special tokens,
                 sentencepiece's ids of each piece between them (llama.cpp's rule)
  chat_templates.json      templates (SmolLM2's from its GGUF, Gemma 4's from llama.cpp's test vocabulary,
                 one exercising the transformers extensions) with messages and transformers' rendering
"""
import gzip
import json
import os
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"
LLAMA_CPP = Path(os.environ.get("LLAMA_CPP", "/opt/lattice-peers/src/llama_cpp_python-0.3.36/vendor/llama.cpp"))
SMOLLM2_GGUF = Path(os.environ.get(
    "SMOLLM2_GGUF", os.path.expanduser("~/.cache/lattice/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")))
SLICE_VOCABS = ["gpt-2", "llama-bpe", "qwen2", "qwen35", "starcoder", "llama-spm", "phi-3"]
TOKEN_TYPE_NORMAL, TOKEN_TYPE_BYTE = 1, 6

TRAIN_TEXT = [
    "Hello world! Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces; models read the pieces.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 1234 and 3.14 appear in text too.",
    "Café, naïve, über: accents are characters as well.",
]
SAMPLE_TEXT = [
    "Hello world!",
    "  two leading spaces and a trailing one ",
    "Café naïve über 日本語 🤖 👨‍👩‍👧",
    "def add(a, b):\n    return a + b\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<s>text after BOS</s> and <unk>",
    "",
]


def read_gguf(path):
    from gguf import GGUFReader
    fields = GGUFReader(str(path)).fields
    return {name: field.contents() for name, field in fields.items()}


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (byte-level BPE writes tokens in it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def vocab_slice(name):
    path = LLAMA_CPP / "models" / f"ggml-vocab-{name}.gguf"
    md = read_gguf(path)
    inputs = (LLAMA_CPP / "models" / f"{path.name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (LLAMA_CPP / "models" / f"{path.name}.out").read_text(encoding="utf-8").split("\n")
    cases = [[s, [int(x) for x in o.split()]] for s, o in zip(inputs, outputs)]
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    if md["tokenizer.ggml.model"] == "gpt2":
        table = bytes_to_unicode()
        haystacks = ["".join(table[b] for b in s.encode("utf-8")) for s, _ in cases]
        relevant = lambda t: any(t in h for h in haystacks)  # noqa: E731
    else:
        haystacks = ["▁" + s.replace(" ", "▁") for s, _ in cases]
        relevant = lambda t: any(t in h or (t.startswith("▁") and t[1:] in h) for h in haystacks)  # noqa: E731
    keep = {i for i, t in enumerate(tokens) if types[i] != TOKEN_TYPE_NORMAL or relevant(t)}
    for _, ids in cases:
        assert set(ids) <= keep, (name, set(ids) - keep)
    metadata = {k: v for k, v in md.items()
                if k.startswith("tokenizer.ggml.") and k not in (
                    "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores",
                    "tokenizer.ggml.merges")}
    sliced = {"n_vocab": len(tokens), "metadata": metadata, "cases": cases,
              "tokens": {i: tokens[i] for i in sorted(keep)},
              "types": {i: types[i] for i in sorted(keep) if types[i] != TOKEN_TYPE_NORMAL}}
    if "tokenizer.ggml.scores" in md:
        sliced["scores"] = {i: md["tokenizer.ggml.scores"][i] for i in sorted(keep)}
    if "tokenizer.ggml.merges" in md:
        kept_text = {tokens[i] for i in keep}
        sliced["merges"] = [m for m in md["tokenizer.ggml.merges"] if m.replace(" ", "", 1) in kept_text]
    print(f"{name}: {len(keep)}/{len(tokens)} tokens, {len(sliced.get('merges', []))} merges, {len(cases)} cases")
    return sliced


def make_vocab_slices():
    data = {name: vocab_slice(name) for name in SLICE_VOCABS}
    with gzip.open(OUT / "llamacpp_vocab_slices.json.gz", "wt", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, separators=(",", ":"))


CHATML_WITH_BOS = ("{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' "
                   "+ message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tiny_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    folder = OUT / "tiny-bpe"
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
              "chat_template": [{"name": "default", "template": CHATML_WITH_BOS},
                                {"name": "plain", "template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"}]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    eos_ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos_ids}) + "\n")

    hf = AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🤖"}]
    expected = {
        "bos_id": bos, "eos_ids": eos_ids, "vocab_size": len(hf),
        "encode": {s: hf.encode(s) for s in SAMPLE_TEXT},
        "decode": {s: hf.decode(hf.encode(s)) for s in SAMPLE_TEXT},
        "decode_skip_special": {s: hf.decode(hf.encode(s), skip_special_tokens=True) for s in SAMPLE_TEXT},
        "messages": messages,
        "chat": hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
    }
    (OUT / "tiny-bpe_expected.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1) + "\n")


def make_tiny_spm():
    import sentencepiece as spm

    folder = OUT / "tiny-spm"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = str(folder / "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT * 4), model_prefix=prefix, model_type="bpe", vocab_size=330,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        control_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    os.remove(prefix + ".vocab")
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
              "chat_template": CHATML_WITH_BOS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")

    specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
    split = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    def encode(text):
        # llama.cpp's rule: special tokens whole, sentencepiece (with its dummy prefix) on the text between
        ids, start = [], 0
        for m in split.finditer(text):
            ids += sp.encode(text[start:m.start()]) if m.start() > start else []
            ids.append(specials[m.group()])
            start = m.end()
        return ids + (sp.encode(text[start:]) if start < len(text) else [])

    expected = {"bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "vocab_size": sp.get_piece_size(),
                "encode": {s: encode(s) for s in SAMPLE_TEXT},
                "plain_decode": {s: sp.decode(sp.encode(s)) for s in SAMPLE_TEXT}}
    (OUT / "tiny-spm_expected.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1) + "\n")


FEATURES_TEMPLATE = """{%- set ns = namespace(n_user=0) -%}
{{ bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {%- if message['role'] == 'system' %}{% continue %}{% endif %}
    {%- if message['role'] == 'user' %}{% set ns.n_user = ns.n_user + 1 %}{% endif %}
<{{ message['role'] }} n="{{ ns.n_user }}">
    {%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}
    {%- else %}{{ message['content'] }}{% endif %}</{{ message['role'] }}>
{% endfor %}
{%- if tools %}tools: {{ tools | tojson }}
{% endif %}
{%- if add_generation_prompt %}<assistant>{% endif %}"""


def make_chat_templates():
    from transformers.utils.chat_template_utils import render_jinja_template

    smollm2 = read_gguf(SMOLLM2_GGUF)["tokenizer.chat_template"]
    gemma4 = read_gguf(LLAMA_CPP / "models" / "ggml-vocab-gemma-4.gguf")["tokenizer.chat_template"]
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather <now> in a city, e.g. Zürich",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                       "required": ["city"]}}}]
    cases = [
        ("smollm2 system+user", smollm2, [{"role": "system", "content": "You are terse."},
                                          {"role": "user", "content": "What is 12 times 12?"}], True, None),
        ("smollm2 user only (template adds its system prompt)", smollm2,
         [{"role": "user", "content": "Hi"}], True, None),
        ("smollm2 multi-turn, no generation prompt", smollm2,
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 😊"},
          {"role": "user", "content": "Bye"}], False, None),
        ("gemma4 tools", gemma4, [{"role": "system", "content": "Use tools."},
                                  {"role": "user", "content": "Weather in Zürich?"}], True, tools),
        ("features", FEATURES_TEMPLATE, [{"role": "system", "content": "skipped"},
                                         {"role": "user", "content": "a < b & c"},
                                         {"role": "assistant", "content": "ok"},
                                         {"role": "user", "content": "again"}], True, tools),
    ]
    out = []
    for name, template, messages, add_generation_prompt, case_tools in cases:
        rendered, _ = render_jinja_template(conversations=[messages], tools=case_tools, chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token="<bos>", eos_token="<eos>")
        out.append({"name": name, "template": template, "messages": messages, "tools": case_tools,
                    "add_generation_prompt": add_generation_prompt, "bos_token": "<bos>", "eos_token": "<eos>",
                    "expected": rendered[0]})
    (OUT / "chat_templates.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    steps = {"slices": make_vocab_slices, "bpe": make_tiny_bpe, "spm": make_tiny_spm, "chat": make_chat_templates}
    for step in sys.argv[1:] or steps:
        steps[step]()
