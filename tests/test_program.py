"""The program builder: fusion, dispatch counts, barriers, arena layout, C struct layouts."""
import os
import shutil
import subprocess
import sysconfig

import numpy as np
import pytest

from conftest import FIXTURES
from lattice.config import ModelConfig
from lattice.errors import ConfigError, UnsupportedModelError
from lattice.formats import open_checkpoint
from lattice.program import ARENA, BARRIER, C_STRUCTS, ShapeOnlyCheckpoint, VARIANTS, build, needs_barrier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-qwen35"]

QWEN35_08B = ModelConfig(
    model_type="qwen3_5", vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256, partial_rotary_factor=0.25, qk_norm=True,
    norm_add_one=True, attn_output_gate=True, tie_word_embeddings=True, rope_theta=1e7,
    layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6, linear_num_key_heads=16,
    linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4)
SMOLLM2_135M = ModelConfig(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5,
    tie_word_embeddings=True)


@pytest.fixture(scope="module")
def qwen35_shape():
    return build(ShapeOnlyCheckpoint(QWEN35_08B), quant="q8", context=4096, materialize=False)


def test_qwen35_08b_dispatch_budget(qwen35_shape):
    s = qwen35_shape.stats()
    assert s["dispatches"] <= 150
    assert s["per_layer_type"]["linear_attention"] == {"layers": 18, "dispatches": 90, "per_layer": 5.0}
    assert s["per_layer_type"]["full_attention"] == {"layers": 6, "dispatches": 36, "per_layer": 6.0}
    assert s["outside_layers"] == 3
    assert s["dispatches"] == 129


def test_smollm2_shape_stats():
    s = build(ShapeOnlyCheckpoint(SMOLLM2_135M), quant="q8", context=2048, materialize=False).stats()
    assert s["per_layer_type"]["full_attention"]["per_layer"] == 6.0
    assert s["dispatches"] == 30 * 6 + 3


def _layer_kernels(prog, layer, variant="decode"):
    return [(kind, args) for kind, lay, args, _ in prog.notes[variant] if lay == layer]


def test_qwen35_fusion_shape(qwen35_shape):
    """A Gated DeltaNet layer: norm+joint in_proj GEMV, one GDN kernel, out_proj+residual,
    norm+gate/up SiLU GEMV, down+residual. A full-attention layer: norm+q|k|v GEMV, q/k norm +
    RoPE + KV append (+ q|gate split), attention with its output gate, then the same tail."""
    gdn = _layer_kernels(qwen35_shape, 0)
    assert [k for k, _ in gdn] == ["gemv", "gdn", "gemv", "gemv", "gemv"]
    assert gdn[0][1]["flags"] == 1 | 2                      # RMSNorm (1 + w) prologue
    assert gdn[0][1]["rows"] == 2 * 2048 + 2048 + 2048 + 16 + 16   # in_proj qkv | z | b | a
    assert gdn[2][1]["flags"] == 16 and gdn[4][1]["flags"] == 16  # residual epilogues
    assert gdn[3][1]["flags"] == 1 | 2 | 8 and gdn[3][1]["rows"] == 2 * 3584   # interleaved SiLU·mul
    att = _layer_kernels(qwen35_shape, 3)
    assert [k for k, _ in att] == ["gemv", "qk_rope_kv", "attention", "gemv", "gemv", "gemv"]
    assert att[1][1]["flags"] == 1 | 2 | 4                  # q/k norm, add_one, q|gate split
    assert att[1][1]["rotary_dim"] == 64
    assert att[2][1]["flags"] == 1                          # sigmoid output gate
    kinds = [k for k, _, _, _ in qwen35_shape.notes["decode"]]
    assert kinds[0] == "embed" and kinds[-2:] == ["lm_head", "sample"]
    assert qwen35_shape.notes["decode"][-2][2]["flags"] == 1 | 2    # final norm folded into lm_head


@pytest.mark.parametrize("cfg", [QWEN35_08B, SMOLLM2_135M])
def test_attention_output_misses_rope_inputs(cfg):
    """A backend may run each qk_rope_kv and the attention after it as one kernel (CUDA decode), so
    the attention's output must not land on the rope's q, k or v rows: the layout keeps them live
    through the attention (Qwen3.5's output once reused its q|gate rows)."""
    prog = build(ShapeOnlyCheckpoint(cfg), quant="q8", context=1024, materialize=False)
    notes, recs = prog.notes["decode"], prog.dispatches["decode"]
    pairs = 0
    for i in range(len(notes) - 1):
        if notes[i][0] != "qk_rope_kv" or notes[i + 1][0] != "attention":
            continue
        (_, _, ra, rroles), (_, _, aa, aroles) = notes[i], notes[i + 1]
        at = lambda rec, roles, role: int(rec["bind"][roles.index(role)]["offset"])  # noqa: E731
        hd = ra["head_dim"]
        out = at(recs[i + 1], aroles, "out")
        out_end = out + 4 * aa["n_heads"] * hd
        for role, n in (("q", ra["q_stride"]), ("k", ra["n_kv_heads"] * hd), ("v", ra["n_kv_heads"] * hd)):
            start = at(recs[i], rroles, role)
            assert out_end <= start or start + 4 * n <= out, (i, role)
        pairs += 1
    assert pairs == sum(1 for t in cfg.layer_types if t == "full_attention")


def test_dump_one_line_per_dispatch(qwen35_shape):
    text = qwen35_shape.dump()
    lines = text.splitlines()
    assert len(lines) == 1 + len(qwen35_shape.dispatches["decode"])
    assert lines[1].split()[:3] == ["0", "B", "embed"]
    assert "gdn" in lines[3] and "conv_state=T+" in lines[3]
    assert lines[-1].split()[2] == "sample"
    assert len(qwen35_shape.dump("prefill").splitlines()) == len(lines)


def _overlap(a, b):
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2] and (a[3] or b[3])


@pytest.mark.parametrize("variant", VARIANTS)
def test_barriers_exactly_where_needed(qwen35_shape, variant):
    """Between two barriers no dispatch touches what another one writes; every barrier separates
    a dispatch from a conflicting one (none is redundant)."""
    prog = qwen35_shape
    flags = prog.dispatches[variant]["flags"] & BARRIER
    acc = prog.accesses[variant]
    segment = []
    for i, f in enumerate(flags):
        if f:
            if i:
                assert any(_overlap(a, b) for j in segment for a in acc[i] for b in acc[j]), \
                    f"dispatch {i}: barrier without a conflict"
            segment = []
        for j in segment:
            assert not any(_overlap(a, b) for a in acc[i] for b in acc[j]), f"dispatches {j} and {i} race"
        segment.append(i)
    assert flags[0]


def test_independent_dispatches_share_a_segment():
    """q_proj f32 and k/v_proj f16 (native formats) cannot share a GEMV: the two GEMVs read the
    same input and write different outputs, so the second needs no barrier."""
    ck = open_checkpoint(os.path.join(FIXTURES, "tiny-llama"))
    tensors = dict(ck.tensors)

    class F16View:
        def __init__(self, t):
            self.name, self.shape, self.dtype, self._t = t.name, t.shape, "f16", t

        @property
        def raw(self):
            return self._t.to_f32().astype(np.float16)

        def to_f32(self):
            return self.raw.astype(np.float32)

    for i in range(ck.config.num_hidden_layers):
        for p in ("k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{p}.weight"
            tensors[name] = F16View(tensors[name])
    fake = type("Ckpt", (), {"config": ck.config, "tensors": tensors})()
    prog = build(fake, quant=None, context=32)
    kinds = [(k, a.get("wformat")) for k, lay, a, _ in prog.notes["decode"] if lay == 0]
    assert kinds[:2] == [("gemv", 0), ("gemv", 1)]          # f32 q_proj, f16 k|v joint
    assert not prog.dispatches["decode"]["flags"][2] & BARRIER


def test_needs_barrier_rules():
    W, R = True, False
    acc = [[(2, 0, 64, W)],                # 0 writes A
           [(2, 64, 128, W)],              # 1 writes B: independent
           [(2, 0, 64, R)],                # 2 reads A: read after write
           [(2, 128, 192, W), (1, 0, 8, R)],   # 3 independent of 2
           [(2, 0, 32, W)],                # 4 overwrites what 2 read: write after read
           [(1, 0, 8, R)]]                 # 5 reads what nobody wrote since the barrier
    assert needs_barrier(acc) == [True, False, True, False, True, False]


@pytest.mark.parametrize("fixture", TINY)
def test_scratch_reuse_by_liveness(fixture):
    """Replaying the writes byte by byte: every scratch read sees bytes all written by one
    earlier dispatch (no live activation was overwritten by a reuse), and the decode program
    needs less scratch than the sum of its activations."""
    prog = build(open_checkpoint(os.path.join(FIXTURES, fixture)), quant="q8", context=32)
    scratch = ARENA["scratch"]
    for variant in VARIANTS:
        last_writer = np.full(prog.sizes["scratch"], -1)
        for i, acc in enumerate(prog.accesses[variant]):
            for a, s, e, w in acc:
                if a == scratch and not w:
                    writers = set(last_writer[s:e].tolist())
                    assert len(writers) == 1 and -1 not in writers, f"{variant} dispatch {i} reads stale scratch"
            for a, s, e, w in acc:
                if a == scratch and w:
                    last_writer[s:e] = i
    acts = [(s, e) for acc in prog.accesses["decode"][:-2] for a, s, e, w in acc if w and a == scratch]
    assert max(e for _, e in acts) < sum(e - s for s, e in acts)


def test_state_sized_from_context():
    cfg = QWEN35_08B
    a = build(ShapeOnlyCheckpoint(cfg), quant="q8", context=1024, materialize=False)
    b = build(ShapeOnlyCheckpoint(cfg), quant="q8", context=2048, materialize=False)
    kv = 2 * 2 * cfg.num_key_value_heads * cfg.head_dim          # K and V, f16, per position per layer
    assert b.sizes["state"] - a.sizes["state"] == pytest.approx(6 * kv * 1024 + 4 * 1024, abs=64 * 40)
    off, nbytes = a.layout["state"][(0, "ssm")]
    assert nbytes == 4 * 16 * 128 * 128                          # f32 recurrent state
    assert a.layout["state"][(0, "conv")][1] == 4 * 3 * (2 * 2048 + 2048)


def test_recurrent_states_form_one_span_with_its_copy():
    """Every GDN layer's conv and recurrent state lie in one span of the STATE arena ("recurrent"),
    which the runtime zeroes and copies ("recurrent_copy", as large, after it) in one call each;
    no KV cache lies inside it. Attention-only models have neither."""
    prog = build(ShapeOnlyCheckpoint(QWEN35_08B), quant="q8", context=1024, materialize=False)
    lay = prog.layout["state"]
    (start, size), (copy, copy_size) = lay["recurrent"], lay["recurrent_copy"]
    gdn = [v for k, v in lay.items() if isinstance(k, tuple) and k[1] in ("conv", "ssm")]
    kv = [v for k, v in lay.items() if isinstance(k, tuple) and k[1] in ("k", "v")]
    assert len(gdn) == 2 * 18 and len(kv) == 2 * 6
    assert min(o for o, _ in gdn) == start and max(o + n for o, n in gdn) == start + size
    assert all(o + n <= start or o >= start + size for o, n in kv)
    assert copy_size == size and copy >= start + size and copy + size <= prog.sizes["state"]
    plain = build(ShapeOnlyCheckpoint(SMOLLM2_135M), quant="q8", context=256, materialize=False)
    assert "recurrent" not in plain.layout["state"] and "recurrent_copy" not in plain.layout["state"]


def test_bad_build_arguments():
    ck = ShapeOnlyCheckpoint(SMOLLM2_135M)
    with pytest.raises(ConfigError, match="quant"):
        build(ck, quant="q5", materialize=False)
    with pytest.raises(ConfigError, match="context"):
        build(ck, context=0, materialize=False)
    with pytest.raises(ConfigError, match="prefill_chunk"):
        build(ck, prefill_chunk=0, materialize=False)


def test_forward_must_use_traced_values():
    class Bad:
        @staticmethod
        def forward(ops, cfg, weights, ids):
            return ops.lm_head(np.zeros((1, cfg.hidden_size)), weights["model.embed_tokens.weight"])

    from lattice.program import Tracer
    ck = ShapeOnlyCheckpoint(SMOLLM2_135M)
    with pytest.raises(UnsupportedModelError, match="lm_head"):
        Bad.forward(Tracer(ck.tensors), ck.config, ck.tensors, None)


def test_views_resolve_to_joint_outputs(qwen35_shape):
    # the GDN kernel reads q|k|v, z, a, b as column ranges of the joint in_proj output
    gdn_args = _layer_kernels(qwen35_shape, 0)[1][1]
    assert gdn_args["x_stride"] == gdn_args["z_stride"] == gdn_args["a_stride"] == 2 * 2048 + 2048 + 2048 + 32


def test_c_struct_layouts_match_header(tmp_path):
    """Every field offset and struct size of the numpy mirrors equals the C compiler's."""
    cc = shutil.which(os.environ.get("CC") or sysconfig.get_config_var("CC").split()[0]) or shutil.which("cc")
    assert cc, "a C compiler is needed to check the header"
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "lattice_shared.h"', "int main(void) {"]
    for name, dt in C_STRUCTS.items():
        lines.append(f'printf("{name} . %zu\\n", sizeof({name}));')
        for field in dt.names:
            lines.append(f'printf("{name} {field} %zu\\n", offsetof({name}, {field}));')
    lines.append("return 0; }")
    src = tmp_path / "offsets.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "offsets"
    subprocess.run([cc, "-I", os.path.join(ROOT, "metal"), str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    c = {(s, f): int(v) for s, f, v in (line.split() for line in out if line)}
    for name, dt in C_STRUCTS.items():
        assert c[(name, ".")] == dt.itemsize, name
        for field in dt.names:
            assert c[(name, field)] == dt.fields[field][1], f"{name}.{field}"
