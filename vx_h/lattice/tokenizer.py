"""Tokenizers for every model format, and streaming detokenization.

Three sources, one `Tokenizer`:
- a folder with `tokenizer.json` (the `tokenizers` package; tokenizes exactly as Hugging Face does,
  with whatever normalizer the file declares);
- a folder with only `tokenizer.model` (`sentencepiece`);
- a GGUF file's embedded vocabulary, tokenized exactly as llama.cpp does:
  * `gpt2` (byte-level BPE): vocab + merges built into a `tokenizers` BPE, pre-tokenized with the regexes
    llama.cpp uses for `tokenizer.ggml.pre`. No Unicode normalization, because llama.cpp does none
    (Hugging Face's Qwen tokenizers apply NFC first; on NFC-changing input the two differ, and a GGUF
    model is meant to see what llama.cpp would give it);
  * `llama` (SentencePiece BPE with scores and <0xNN> byte fallback): built into a sentencepiece
    model proto (BPE model, merges ranked by piece score, which is llama.cpp's SPM algorithm).

Special tokens written in the text (`<|im_start|>`, ...) are always parsed as single tokens.
For SentencePiece vocabularies the text is split at special tokens first and every plain-text piece is
encoded on its own (with the dummy-prefix space, when the model uses one), as llama.cpp does (and
transformers' legacy Llama tokenizer; tokenizer.model folders follow the same rule); decoding drops that
space again after each special token, so decode(encode(s)) == s.
Unlike transformers and llama.cpp, encode never puts a second BOS before one already at the start of
the text (as a chat template that writes {{ bos_token }} would leave it).
"""
from __future__ import annotations

import json
import os
import re
import struct

from .chat_template import ChatTemplate, load_folder_chat_template, load_gguf_chat_template
from .errors import ChatTemplateError, TokenizerError

# GGUF / SentencePiece token types (the same numbering in both)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes for GGUF byte-level BPE vocabularies, keyed by `tokenizer.ggml.pre`. Each entry
# is a list applied in turn (each splits the pieces left by the one before), as llama.cpp applies them.
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_CONTRACTIONS = r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"""
_LLAMA3 = _CONTRACTIONS + r"""|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_QWEN2 = _CONTRACTIONS + r"""|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_QWEN35 = (_CONTRACTIONS + r"""|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_PRE_TOKENIZERS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt-2": [_GPT2],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "qwen35": [_QWEN35],
    "smollm": [r"\p{N}", _GPT2],
}
_PRE_ALIASES = {
    "gpt2": "gpt-2", "phi-2": "gpt-2", "olmo": "gpt-2", "mpt": "gpt-2",
    "llama-bpe": "llama3", "llama-v3": "llama3", "falcon3": "llama3",
    "deepseek-r1-qwen": "qwen2", "megrez": "qwen2",
    "starcoder": "smollm", "refact": "smollm", "codeshell": "smollm", "command-r": "smollm",
}
# llama.cpp's ignore_merges: a pre-token that is itself in the vocab is one token, merges or not.
_IGNORE_MERGES = {"llama3"}

# Control tokens that end a turn in common vocabularies; like llama.cpp, a GGUF model stops on these
# as well as on its declared EOS/EOT/EOM ids.
_END_OF_TURN_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>",
                      "<|end|>", "<|end_of_text|>", "<|return|>", "<|call|>", "<EOT>")


class Tokenizer:
    """Text <-> token ids for one model, with its BOS/EOS conventions and chat template."""

    def __init__(self, backend, *, bos_id=None, eos_ids=(), add_bos=False, chat_template=None,
                 bos_token=None, eos_token=None, source=""):
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template: ChatTemplate | None = chat_template
        self.source = source
        self.bos_token = bos_token if bos_token is not None else (
            self.id_to_piece(bos_id) if bos_id is not None else "")
        self.eos_token = eos_token if eos_token is not None else (
            self.id_to_piece(self.eos_ids[0]) if self.eos_ids else "")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt) -> "Tokenizer":
        if getattr(ckpt, "folder", None) is not None:
            return cls.from_folder(ckpt.folder)
        return cls.from_gguf_metadata(ckpt.metadata, source=str(getattr(ckpt, "path", "GGUF")))

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        folder = str(folder)
        tokenizer_config = _read_json_if_present(os.path.join(folder, "tokenizer_config.json"))
        json_path = os.path.join(folder, "tokenizer.json")
        spm_path = os.path.join(folder, "tokenizer.model")
        if os.path.isfile(json_path):
            backend = _HFBackend.from_file(json_path)
        elif os.path.isfile(spm_path):
            with open(spm_path, "rb") as f:
                proto = f.read()
            backend = _SentencePieceBackend(proto, spm_path, added_tokens=_added_tokens_from_config(tokenizer_config))
        else:
            raise TokenizerError(f"{folder}: no tokenizer found (expected tokenizer.json or tokenizer.model)")

        config = _read_json_if_present(os.path.join(folder, "config.json"))
        generation_config = _read_json_if_present(os.path.join(folder, "generation_config.json"))
        bos_token = _token_content(tokenizer_config.get("bos_token"))
        eos_token = _token_content(tokenizer_config.get("eos_token"))
        bos_id = backend.piece_to_id(bos_token) if bos_token else None
        if bos_id is None:
            bos_id = _first_int(generation_config.get("bos_token_id"), config.get("bos_token_id"))
        eos_ids = [backend.piece_to_id(eos_token) if eos_token else None]
        for value in (generation_config.get("eos_token_id"), config.get("eos_token_id")):
            eos_ids += value if isinstance(value, list) else [value]
        eos_ids = [i for i in eos_ids if isinstance(i, int) and 0 <= i < backend.vocab_size]
        if "add_bos_token" in tokenizer_config:
            add_bos = bool(tokenizer_config["add_bos_token"])
        else:
            add_bos = backend.adds_bos_by_default(bos_id)
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                   chat_template=load_folder_chat_template(folder),
                   bos_token=bos_token, eos_token=eos_token, source=folder)

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, source: str = "GGUF metadata") -> "Tokenizer":
        model = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise TokenizerError(f"{source}: no embedded tokenizer (tokenizer.ggml.model / "
                                 f"tokenizer.ggml.tokens missing)")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens must be a non-empty list of strings")
        types = _gguf_list(metadata, "tokenizer.ggml.token_type", len(tokens), NORMAL, int, source)
        if model == "gpt2":
            backend = _HFBackend.from_gguf_bpe(metadata, tokens, types, source)
            add_bos_default = False
        elif model == "llama":
            scores = _gguf_list(metadata, "tokenizer.ggml.scores", len(tokens), 0.0, float, source)
            add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            # sentencepiece wants exactly one unknown piece; vocabularies such as Phi-3 type their padding
            # tokens UNKNOWN too. They are matched whole before sentencepiece sees the text, so CONTROL
            # (never produced from plain text) is what they are to it.
            unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
            if unk_id is None:
                unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
            proto_types = [CONTROL if t == UNKNOWN and i != unk_id else t for i, t in enumerate(types)]
            proto = spm_model_proto(tokens, scores, proto_types, add_dummy_prefix=add_prefix)
            backend = _SentencePieceBackend(proto, source, token_types=types)
            add_bos_default = True
        else:
            raise TokenizerError(f"{source}: unsupported GGUF tokenizer model {model!r} "
                                 f"(tokenizer.ggml.model; supported: gpt2, llama)")

        def token_id(key):
            value = metadata.get(key)
            if value is None:
                return None
            if not isinstance(value, int) or not 0 <= value < len(tokens):
                raise TokenizerError(f"{source}: {key} = {value!r} is not a token id "
                                     f"(vocab size {len(tokens)})")
            return value

        bos_id = token_id("tokenizer.ggml.bos_token_id")
        eos_ids = [token_id(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                         "tokenizer.ggml.eom_token_id")]
        eos_ids += [i for i, t in enumerate(tokens) if types[i] == CONTROL and t in _END_OF_TURN_TEXTS]
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                   chat_template=load_gguf_chat_template(metadata, source), source=source)

    # ---- encoding / decoding ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def special_ids(self) -> set:
        return set(self._backend.special_ids)

    def id_to_piece(self, token_id: int) -> str:
        self._check_ids([token_id])
        return self._backend.id_to_piece(token_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in it become single ids. add_bos=None follows
        the model; a BOS already at the start (e.g. from a chat template) is not doubled."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: add_bos=True but the model has no BOS token")
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [_as_int(i) for i in ids]
        self._check_ids(ids)
        return self._backend.decode(ids, skip_special)

    def _check_ids(self, ids):
        n = self._backend.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise TokenizerError(f"token id {i} is out of range (vocab size {n}, {self.source})")

    # ---- chat ---------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None,
                            **template_vars) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(f"{self.source}: the model has no chat template")
        return self.chat_template.render(messages, add_generation_prompt, bos_token=self.bos_token,
                                         eos_token=self.eos_token, tools=tools, **template_vars)


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces. A piece never ends inside a character: bytes of a
    character split over several tokens (byte-level BPE, <0xNN> byte fallback) are held back until it is
    complete, and the concatenated pieces equal tok.decode(all ids).

    It decodes a short window of recent tokens and emits what the newest tokens added, so every decoder
    quirk (dropped dummy-prefix spaces, byte fallback) acts exactly as in a full decode."""

    # A UTF-8 character has at most 4 bytes and a token at least one, so text still incomplete after this
    # many held tokens is invalid bytes, not a split character: emit it (as U+FFFD, like decode does)
    # rather than hold text and re-decode a growing window forever.
    MAX_HELD_TOKENS = 8

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._window: list[int] = []   # the last emitted token(s) (decoder context), then held tokens
        self._read = 0                 # window[:read] is already emitted

    def add(self, token_id: int) -> str:
        token_id = _as_int(token_id)
        self.tokenizer._check_ids([token_id])
        self._window.append(token_id)
        return self._emit(final=len(self._window) - self._read > self.MAX_HELD_TOKENS)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end of the stream comes out as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final):
        known = self.tokenizer.decode(self._window[:self._read], self.skip_special)
        text = self.tokenizer.decode(self._window, self.skip_special)
        # a trailing U+FFFD is an incomplete UTF-8 sequence that the next token may complete
        if not final and (text.endswith("\ufffd") or len(text) < len(known)):
            return ""
        del self._window[:self._read]
        self._read = len(self._window)
        return text[len(known):]


# ---- backends ----------------------------------------------------------------------------------

class _HFBackend:
    """A `tokenizers.Tokenizer` (from tokenizer.json, or built from a GGUF byte-level BPE vocabulary)."""

    def __init__(self, tokenizer, source):
        self._tok = tokenizer
        self.source = source
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)

    @classmethod
    def from_file(cls, path):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            return cls(HFTokenizer.from_file(path), path)
        except Exception as e:  # the Rust side raises plain Exception on malformed JSON / models
            raise TokenizerError(f"{path}: cannot load tokenizer.json: {e}") from e

    @classmethod
    def from_gguf_bpe(cls, metadata, tokens, types, source):
        from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        merges = metadata.get("tokenizer.ggml.merges")
        if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
            raise TokenizerError(f"{source}: tokenizer.ggml.merges must be a list of 'left right' strings "
                                 f"for a gpt2 vocabulary")
        pre = metadata.get("tokenizer.ggml.pre") or "default"
        pre = _PRE_ALIASES.get(pre, pre)
        if pre not in _PRE_TOKENIZERS:
            known = sorted(set(_PRE_TOKENIZERS) | set(_PRE_ALIASES))
            raise TokenizerError(f"{source}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre; "
                                 f"supported: {', '.join(known)})")
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        for i, (left, right) in enumerate(pairs):  # `tokenizers` panics (Rust) on these
            missing = next((t for t in (left, right, left + right) if t not in vocab), None)
            if missing is not None:
                raise TokenizerError(f"{source}: tokenizer.ggml.merges[{i}] = {merges[i]!r} needs "
                                     f"{missing!r}, which is not in the vocabulary")
        try:
            model = BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                        ignore_merges=pre in _IGNORE_MERGES)
        except Exception as e:
            raise TokenizerError(f"{source}: invalid BPE vocabulary/merges: {e}") from e
        tok = HFTokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_TOKENIZERS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        # llama.cpp matches CONTROL, USER_DEFINED and UNKNOWN tokens whole in the text
        tok.add_tokens([AddedToken(tokens[i], special=types[i] != USER_DEFINED, normalized=False)
                        for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED, UNKNOWN)])
        return cls(tok, source)

    def adds_bos_by_default(self, bos_id):
        # tokenizer.json states it in its post-processor: does it put BOS in front of an empty text?
        return bos_id is not None and self._tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special):
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_piece(self, i):
        piece = self._tok.id_to_token(i)
        if piece is None:
            raise TokenizerError(f"token id {i} is not in the vocabulary ({self.source})")
        return piece

    def piece_to_id(self, piece):
        return self._tok.token_to_id(piece)


class _SentencePieceBackend:
    """A sentencepiece model (tokenizer.model, or a proto built from a GGUF llama vocabulary).

    Special tokens are split out of the text first; sentencepiece encodes the plain text between them."""

    def __init__(self, proto: bytes, source, token_types=None, added_tokens=None):
        import sentencepiece
        self.source = source
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own message
            raise TokenizerError(f"{source}: cannot load SentencePiece model: {e}") from e
        sp = self._sp
        n = sp.get_piece_size()
        if token_types is None:
            # (sentencepiece's API does not tell user-defined pieces apart; it matches them itself)
            token_types = [CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else NORMAL
                           for i in range(n)]
        self._pieces = [sp.id_to_piece(i) for i in range(n)]
        # matched whole in the text and written verbatim on decode: id -> text
        specials = {i: self._pieces[i] for i in range(n) if token_types[i] in (CONTROL, UNKNOWN, USER_DEFINED)}
        special_ids = {i for i in specials if token_types[i] != USER_DEFINED}
        for i, (text, special) in (added_tokens or {}).items():
            specials[i] = text
            (special_ids.add if special else special_ids.discard)(i)
        self._special_text = specials
        self.special_ids = frozenset(special_ids)
        self.vocab_size = max(n, max(specials, default=-1) + 1)
        by_text = {}
        for i, text in sorted(specials.items(), reverse=True):   # the lowest id wins a duplicate text
            if text:
                by_text[text] = i
        self._special_by_text = by_text
        self._split = (re.compile("|".join(re.escape(t) for t in sorted(by_text, key=len, reverse=True)))
                       if by_text else None)

    def adds_bos_by_default(self, bos_id):
        return bos_id is not None   # the Llama/sentencepiece convention

    def encode(self, text):
        if self._split is None:
            return self._sp.encode(text) if text else []
        ids, start = [], 0
        for m in self._split.finditer(text):
            if m.start() > start:
                ids += self._sp.encode(text[start:m.start()])
            ids.append(self._special_by_text[m.group()])
            start = m.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def decode(self, ids, skip_special):
        # runs of plain ids go through sentencepiece (bytes, dummy-prefix space); specials are verbatim
        parts, run = [], []
        for i in ids:
            if i in self._special_text:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if not (skip_special and i in self.special_ids):
                    parts.append(self._special_text[i])
            elif i < len(self._pieces):
                run.append(i)
            else:
                raise TokenizerError(f"token id {i} is not in the vocabulary ({self.source})")
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def id_to_piece(self, i):
        if i < len(self._pieces):
            return self._pieces[i]
        if i not in self._special_text:
            raise TokenizerError(f"token id {i} is not in the vocabulary ({self.source})")
        return self._special_text[i]

    def piece_to_id(self, piece):
        if piece in self._special_by_text:
            return self._special_by_text[piece]
        i = self._sp.piece_to_id(piece)
        return i if self._pieces[i] == piece else None   # sentencepiece maps unknown pieces to unk


# ---- SentencePiece model proto -----------------------------------------------------------------
# The few fields of sentencepiece_model.proto we need, written by hand (protobuf is not a dependency).

def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number, wire_type, payload):
    key = _varint(number << 3 | wire_type)
    if wire_type == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def spm_model_proto(tokens, scores, types, add_dummy_prefix=True, byte_fallback=True) -> bytes:
    """Serialized ModelProto for a SentencePiece BPE vocabulary: pieces ranked by score, identity
    normalization, spaces written as U+2581, optional dummy-prefix space, <0xNN> byte fallback."""
    pieces = b"".join(
        _field(1, 2, _field(1, 2, t.encode("utf-8")) + _field(2, 5, struct.pack("<f", s)) + _field(3, 0, _varint(ty)))
        for t, s, ty in zip(tokens, scores, types))
    trainer_spec = _field(3, 0, _varint(2)) + _field(35, 0, _varint(int(byte_fallback)))   # model_type=BPE
    normalizer_spec = (_field(1, 2, b"identity") + _field(3, 0, _varint(int(add_dummy_prefix)))
                       + _field(4, 0, _varint(0)) + _field(5, 0, _varint(1)))
    return pieces + _field(2, 2, trainer_spec) + _field(3, 2, normalizer_spec)


# ---- helpers ------------------------------------------------------------------------------------

def _as_int(i):
    try:
        return int(i)
    except (TypeError, ValueError):
        raise TokenizerError(f"token id {i!r} is not an integer") from None


def _read_json_if_present(path) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return value


def _token_content(value):
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _first_int(*values):
    for v in values:
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, int):
            return v
    return None


def _added_tokens_from_config(tokenizer_config) -> dict:
    """id -> (content, special) of tokenizer_config.json's added_tokens_decoder (tokens added on top
    of the sentencepiece vocabulary, e.g. chat markers)."""
    added = tokenizer_config.get("added_tokens_decoder") or {}
    out = {}
    for key, value in added.items():
        content = _token_content(value)
        if content is not None and str(key).isdigit():
            special = value.get("special", True) if isinstance(value, dict) else True
            out[int(key)] = (content, bool(special))
    return out


def _gguf_list(metadata, key, n, default, kind, source):
    value = metadata.get(key)
    if value is None:
        return [default] * n
    if not isinstance(value, list) or len(value) != n:
        got = len(value) if isinstance(value, list) else type(value).__name__
        raise TokenizerError(f"{source}: {key} must be a list of {n} entries (one per token), got {got}")
    try:
        return [kind(v) for v in value]
    except (TypeError, ValueError) as e:
        raise TokenizerError(f"{source}: {key} has a non-numeric entry: {e}") from e


__all__ = ["Tokenizer", "StreamingDetokenizer", "spm_model_proto"]
