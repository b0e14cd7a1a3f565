"""A tiny model's whole program (lattice.program.build) executed dispatch by dispatch through the
MSL emulator, with the arenas as numpy arrays: the prefill program on the prompt, then the decode
program replayed step after step (the sampler kernel feeds each step's token to the next one, as
on the GPU). Its greedy tokens must equal the reference decoder's and the CPU backend's, and its
logits the reference's.

Dispatches between two barriers are run in reverse order, so a missing LT_DISPATCH_BARRIER flag
(a dispatch reading what an earlier one of its segment writes) shows up as a wrong result."""
import os

import numpy as np
import pytest

from conftest import FIXTURES
from lattice import program
from lattice.formats import open_checkpoint
from lattice.quant import from_tensor
from lattice.reference import ReferenceDecoder
from msl_emu import Library

METAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "metal")
KERNELS = {  # program kernel name -> (.metal file, kernel function)
    "embed": ("embed.metal", "lt_embed"),
    "rms_norm": ("rmsnorm.metal", "lt_rmsnorm"),
    "gemv": ("gemv.metal", "lt_gemv"),
    "qk_rope_kv": ("rope_kv.metal", "lt_rope_kv"),
    "attention": ("attention.metal", "lt_attention"),
    "gdn": ("gdn.metal", "lt_gdn"),
    "elementwise": ("elementwise.metal", "lt_elementwise"),
    "lm_head": ("lm_head.metal", "lt_lm_head"),
    "sample": ("sample.metal", "lt_sample"),
}
PROMPT = [1, 17, 42, 99, 5]
N_NEW = 6
CONTEXT = 16


class EmulatedMetal:
    """The arenas of one session and the dispatch loop a Metal bridge would encode."""

    def __init__(self, prog, sampling=None, attention_splits=1):
        self.prog = prog
        self.attention_splits = attention_splits
        self.libs = {}
        sizes = prog.sizes
        self.arenas = [np.ascontiguousarray(prog.weights), np.zeros(sizes["state"], np.uint8),
                       np.zeros(sizes["scratch"], np.uint8), np.zeros(sizes["step"], np.uint8),
                       np.zeros(sizes["output"], np.uint8), np.ascontiguousarray(prog.consts)]
        self.unbound = np.zeros(16, np.uint8)
        # attention's split workspace (backend-owned, slot 2 + MAX_BIND): enough for any layer
        width = max(n[2]["n_heads"] * (n[2]["head_dim"] + 2) for v in prog.notes.values() for n in v
                    if n[0] == "attention") if prog.notes else 0
        rows = max(prog.prefill_chunk, prog.logits_chunk)
        self.workspace = np.zeros(4 + rows * attention_splits * width, np.float32)
        step = self.step
        step["ring_cap"] = prog.layout["ring_cap"]
        step["top_p"], step["repetition_penalty"] = 1.0, 1.0  # greedy: temperature 0
        for k, v in (sampling or {}).items():
            if k == "seed":
                step["seed_lo"], step["seed_hi"] = v & 0xFFFFFFFF, v >> 32
            else:
                step[k] = v

    @property
    def step(self):
        return self.arenas[program.ARENA["step"]][:program.STEP_DTYPE.itemsize].view(program.STEP_DTYPE)

    def library(self, name):
        if name not in self.libs:
            self.libs[name] = Library(os.path.join(METAL, name))
        return self.libs[name]

    def run(self, variant):
        """One replay of a program variant; segments between barriers run in reverse order."""
        recs = self.prog.dispatches[variant]
        segments, current = [], []
        for rec in recs:
            if rec["flags"] & program.BARRIER and current:
                segments.append(current)
                current = []
            current.append(rec)
        segments.append(current)
        for seg in segments:
            for rec in reversed(seg):
                self.dispatch(rec)
        assert self.step["error"][0] == 0, program.ERRORS.get(int(self.step["error"][0]))

    def dispatch(self, rec):
        source, fn = KERNELS[program.KERNEL_NAME[int(rec["kernel"])]]
        buffers = [(self.arenas[program.ARENA["const"]], int(rec["args_offset"])),
                   (self.arenas[program.ARENA["step"]], 0)]
        for i in range(program.MAX_BIND):
            b = rec["bind"][i]
            if i >= rec["n_bind"] or b["arena"] == program.ARENA_NONE:
                buffers.append(self.unbound)
            else:
                buffers.append((self.arenas[int(b["arena"])], int(b["offset"])))
        buffers.append(self.workspace)  # slot 2 + MAX_BIND: attention's split workspace
        grid, group = tuple(int(g) for g in rec["grid"]), tuple(int(g) for g in rec["group"])
        if fn == "lt_attention" and self.attention_splits > 1:  # as a backend would encode split-K
            self.library(source).dispatch(fn, buffers, grid[:2] + (self.attention_splits,), group)
            self.library(source).dispatch("lt_attention_reduce", buffers, grid, (64, 1, 1))
        else:
            self.library(source).dispatch(fn, buffers, grid, group)

    def generate(self, prompt, n_new):
        """Prefill the prompt, then decode; returns (tokens, logits of each token's step)."""
        lay = self.prog.layout
        ids = self.arenas[program.ARENA["step"]][lay["ids"]:lay["ids"] + 4 * len(prompt)].view(np.uint32)
        ids[:] = prompt
        step = self.step
        step["pos"], step["n_tokens"] = 0, len(prompt)
        logits_row = self.arenas[program.ARENA["output"]][lay["logits"]:lay["logits"] + 4 * self.prog.vocab]
        logits = []
        self.run("prefill")
        logits.append(logits_row.view(np.float32).copy())
        for _ in range(n_new - 1):
            self.run("decode")
            logits.append(logits_row.view(np.float32).copy())
        ring = self.arenas[program.ARENA["output"]][:4 * lay["ring_cap"]].view(np.uint32)
        assert self.step["step"][0] == n_new and self.step["pos"][0] == len(prompt) + n_new - 1
        return [int(t) for t in ring[:n_new]], np.stack(logits)


def test_emulated_metal_logits_program_matches_reference_prefill():
    """The teacher-forcing variant: every token's logits (lm_head over all rows)."""
    ck = open_checkpoint(os.path.join(FIXTURES, "tiny-qwen35"))
    prog = program.build(ck, quant="q8", context=CONTEXT, prefill_chunk=1, logits_chunk=len(PROMPT))
    em = EmulatedMetal(prog)
    lay = prog.layout
    em.arenas[program.ARENA["step"]][lay["ids"]:lay["ids"] + 4 * len(PROMPT)].view(np.uint32)[:] = PROMPT
    em.step["n_tokens"] = len(PROMPT)
    em.run("logits")
    out = em.arenas[program.ARENA["output"]][lay["logits"]:lay["logits"] + 4 * prog.vocab * len(PROMPT)]
    ref_ck = _Ckpt(ck.config, {n: _Dequantized(t, "q8") if len(t.shape) == 2 else t for n, t in ck.tensors.items()})
    expected = ReferenceDecoder(ref_ck, context=CONTEXT).prefill(PROMPT)
    np.testing.assert_allclose(out.view(np.float32).reshape(len(PROMPT), -1), expected, rtol=0,
                               atol=2e-3 * np.abs(expected).max())
    assert em.step["next_token"][0] == int(np.argmax(expected[-1]))


class _Dequantized:
    """A weight as the kernels see it after quantization: the reference runs on these values."""

    def __init__(self, t, kind):
        self.name, self.shape, self.dtype, self._t, self._kind = t.name, t.shape, "f32", t, kind

    def to_f32(self):
        return from_tensor(self._t, self._kind).dequantize()


class _Ckpt:
    def __init__(self, config, tensors):
        self.config, self.tensors = config, tensors


@pytest.mark.parametrize("fixture,quant", [("tiny-llama", None), ("tiny-qwen35", None), ("tiny-llama", "q8"),
                                           ("tiny-qwen35", "q4")])
def test_emulated_metal_program_reproduces_reference_greedy_tokens(fixture, quant):
    ck = open_checkpoint(os.path.join(FIXTURES, fixture))
    prog = program.build(ck, quant=quant, context=CONTEXT, prefill_chunk=len(PROMPT), logits_chunk=1)
    tokens, logits = EmulatedMetal(prog).generate(PROMPT, N_NEW)
    ref_ck = ck if quant is None else _Ckpt(ck.config, {
        n: _Dequantized(t, quant) if len(t.shape) == 2 else t for n, t in ck.tensors.items()})
    ref_tokens, ref_logits = ReferenceDecoder(ref_ck, context=CONTEXT).greedy(PROMPT, N_NEW)
    assert tokens == ref_tokens
    scale = np.abs(ref_logits).max()
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=2e-3 * scale)


def test_emulated_metal_program_with_split_attention_matches_reference():
    """Attention split across threadgroups (grid.z = 3, + lt_attention_reduce) in every layer,
    over a 70-token prompt: every split holds keys (splits are whole 32-key chunks)."""
    ck = open_checkpoint(os.path.join(FIXTURES, "tiny-qwen35"))
    prompt = [(7 * i + 3) % 250 for i in range(70)]
    prog = program.build(ck, quant=None, context=80, prefill_chunk=len(prompt), logits_chunk=1)
    tokens, logits = EmulatedMetal(prog, attention_splits=3).generate(prompt, 3)
    ref_tokens, ref_logits = ReferenceDecoder(ck, context=80).greedy(prompt, 3)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=2e-3 * np.abs(ref_logits).max())


@pytest.mark.parametrize("fixture", ["tiny-llama", "tiny-qwen35"])
def test_emulated_metal_program_matches_cpu_backend(fixture):
    from lattice._runtime import Runtime
    ck = open_checkpoint(os.path.join(FIXTURES, fixture))
    prog = program.build(ck, quant=None, context=CONTEXT, prefill_chunk=len(PROMPT), logits_chunk=1)
    rt = Runtime(prog, n_threads=1)
    cpu = rt.generate(rt.new_state(), PROMPT, N_NEW, sampling={"temperature": 0.0})
    tokens, _ = EmulatedMetal(prog).generate(PROMPT, N_NEW)
    assert tokens == cpu["tokens"]


def test_emulated_metal_program_samples_like_cpu_backend():
    """Seeded sampling with every filter and penalties on: the same tokens as the CPU backend."""
    from lattice._runtime import Runtime
    ck = open_checkpoint(os.path.join(FIXTURES, "tiny-qwen35"))
    prog = program.build(ck, quant=None, context=CONTEXT, prefill_chunk=len(PROMPT), logits_chunk=1)
    sampling = dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.2,
                    presence_penalty=0.1, frequency_penalty=0.1, seed=2024)
    rt = Runtime(prog, n_threads=1)
    cpu = rt.generate(rt.new_state(), PROMPT, N_NEW, sampling=sampling)
    tokens, _ = EmulatedMetal(prog, sampling).generate(PROMPT, N_NEW)
    assert tokens == cpu["tokens"]
    assert len(set(tokens)) > 1
