"""The program builder: a model family's forward pass -> a flat, immutable decode program.

    prog = build(ckpt, quant="q8" | "q4" | None, context=4096)
    prog.stats(); print(prog.dump())

Three stages, all plain Python, run once per load:

1. Trace. The family's `forward(ops, cfg, weights, ids)` runs against `Tracer`, a symbolic `ops`
   object (the same contract `lattice.reference.NumpyOps` executes eagerly). Every call records an
   `Op`; activations are `Value`s (a feature width, no data).
2. Fuse. Patterns over the op graph become kernels (`Kernel`): a norm folds into the GEMV(s) that
   read it, linears sharing an input become one GEMV over concatenated rows, gate/up become one
   interleaved GEMV with a SiLU·mul epilogue, residual adds and biases go into GEMV epilogues, q/k
   norm + RoPE + KV append become one kernel, the whole Gated DeltaNet step is one kernel, the final
   norm folds into the lm_head, and sampling is the last kernel.
3. Lay out and emit. Weights are converted once (Lattice Q8/Q4 split planes, f16, f32 vectors)
   into the WEIGHTS arena; per-sequence state (f16 KV cache, f32 conv/recurrent state, token counts)
   is sized from the context length; activations share the SCRATCH arena by liveness. Each kernel
   becomes an `lt_dispatch` record (numpy structured array with the C layout of
   metal/lattice_shared.h) plus its args struct in the CONST blob. Nothing per step is in the
   program: kernels read position, token, RNG and sampling parameters from the STEP arena.

Two programs come out of one trace: `decode` (T = 1, replayed every step) and `prefill`
(T <= prefill_chunk tokens per call, the number read from step-args); they share the weights,
state and step-args layouts, so one session state serves both.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, UnsupportedModelError
from .models import DeltaNetState, KVCache, check_weights, family_for


# ============================================================================================ tracing

class Value:
    """A symbolic activation [T, width]. A view (split part) points at its source: features
    [col, col + width) of `src`; a per-head view (split_heads part) also has `heads` =
    (n_heads, head_stride, part_size)."""
    __slots__ = ("width", "op", "src", "col", "heads", "name")

    def __init__(self, width, op=None, src=None, col=0, heads=None):
        self.width, self.op, self.src, self.col, self.heads = int(width), op, src, int(col), heads
        self.name = None

    def __repr__(self):
        return f"<{self.name or 'v'} [{self.width}]>"


@dataclass(eq=False)
class Op:
    kind: str
    ins: list                      # Values
    weights: dict                  # role -> weight name (or None)
    params: dict
    out: list = field(default_factory=list)
    index: int = 0                 # position in the trace


class Tracer:
    """The ops contract, recorded. Weights are identified by object identity against the
    checkpoint's tensor dict (model code passes them through unchanged)."""

    def __init__(self, weights: dict):
        self.weights = weights
        self._names = {id(t): n for n, t in weights.items()}
        self.ops: list[Op] = []
        self.derived: dict[str, np.ndarray] = {}      # name -> f32 array computed by model code
        self.ids = Value(1)
        self.ids.name = "ids"

    def _w(self, w):
        if w is None:
            return None
        if isinstance(w, np.ndarray):                # e.g. RoPE inv_freq: stored as an f32 constant
            arr = np.ascontiguousarray(w, dtype=np.float32)
            name = "derived." + hashlib.sha1(arr.tobytes()).hexdigest()[:12]
            self.derived[name] = arr
            return name
        name = self._names.get(id(w))
        if name is None:
            raise UnsupportedModelError(f"model code passed a weight that is not in the checkpoint: {w!r}")
        return name

    def _shape(self, name):
        return tuple(self.derived[name].shape) if name in self.derived else tuple(self.weights[name].shape)

    def _op(self, kind, ins, weights, params, widths):
        op = Op(kind, list(ins), {k: self._w(v) for k, v in weights.items()}, params, index=len(self.ops))
        op.out = [Value(w, op) for w in widths]
        self.ops.append(op)
        return op.out[0] if len(widths) == 1 else tuple(op.out)

    @staticmethod
    def _check(x, width, what):
        if not isinstance(x, Value):
            raise UnsupportedModelError(f"{what}: expected a traced activation, got {type(x).__name__}")
        if width is not None and x.width != width:
            raise UnsupportedModelError(f"{what}: activation has {x.width} features, expected {width}")

    # the contract ---------------------------------------------------------------------------
    def embed(self, table, ids):
        name = self._w(table)
        return self._op("embed", [self.ids], {"table": table}, {}, [self._shape(name)[1]])

    def rms_norm(self, x, w, eps, add_one):
        self._check(x, None, "rms_norm")
        return self._op("rms_norm", [x], {"w": w}, {"eps": float(eps), "add_one": bool(add_one)}, [x.width])

    def head_rms_norm(self, x, w, n_heads, eps, add_one):
        self._check(x, None, "head_rms_norm")
        return self._op("head_rms_norm", [x], {"w": w},
                        {"n_heads": int(n_heads), "eps": float(eps), "add_one": bool(add_one)}, [x.width])

    def linear(self, x, w, bias=None):
        n, k = (int(d) for d in w.shape)
        self._check(x, k, "linear")
        return self._op("linear", [x], {"w": w, "bias": bias}, {}, [n])

    def add(self, a, b):
        self._check(a, None, "add")
        self._check(b, a.width, "add")
        return self._op("add", [a, b], {}, {}, [a.width])

    def silu_mul(self, gate, up):
        self._check(gate, None, "silu_mul")
        self._check(up, gate.width, "silu_mul")
        return self._op("silu_mul", [gate, up], {}, {}, [gate.width])

    def sigmoid_mul(self, x, gate):
        self._check(x, None, "sigmoid_mul")
        self._check(gate, x.width, "sigmoid_mul")
        return self._op("sigmoid_mul", [x, gate], {}, {}, [x.width])

    def split(self, x, sizes):
        self._check(x, sum(sizes), "split")
        parts, col = [], 0
        for s in sizes:
            parts.append(Value(s, None, src=x, col=col))
            col += s
        return tuple(parts)

    def split_heads(self, x, n_heads, sizes):
        self._check(x, n_heads * sum(sizes), "split_heads")
        parts, col = [], 0
        for s in sizes:
            parts.append(Value(n_heads * s, None, src=x, col=col, heads=(int(n_heads), sum(sizes), s)))
            col += s
        return tuple(parts)

    def rope(self, x, n_heads, head_dim, rotary_dim, inv_freq):
        self._check(x, n_heads * head_dim, "rope")
        return self._op("rope", [x], {"inv_freq": inv_freq},
                        {"n_heads": int(n_heads), "head_dim": int(head_dim), "rotary_dim": int(rotary_dim)},
                        [x.width])

    def attention(self, q, k, v, layer, n_heads, n_kv_heads, head_dim, scale):
        self._check(q, n_heads * head_dim, "attention q")
        self._check(k, n_kv_heads * head_dim, "attention k")
        self._check(v, n_kv_heads * head_dim, "attention v")
        return self._op("attention", [q, k, v], {},
                        {"layer": int(layer), "n_heads": int(n_heads), "n_kv_heads": int(n_kv_heads),
                         "head_dim": int(head_dim), "scale": float(scale)}, [n_heads * head_dim])

    def conv1d_silu(self, x, w, layer):
        self._check(x, int(w.shape[0]), "conv1d_silu")
        return self._op("conv1d_silu", [x], {"w": w},
                        {"layer": int(layer), "kernel": int(w.shape[-1])}, [x.width])

    def gated_delta_rule(self, q, k, v, a, b, A_log, dt_bias, layer, n_k_heads, n_v_heads, k_dim, v_dim):
        for x, wdt, what in ((q, n_k_heads * k_dim, "q"), (k, n_k_heads * k_dim, "k"),
                             (v, n_v_heads * v_dim, "v"), (a, n_v_heads, "a"), (b, n_v_heads, "b")):
            self._check(x, wdt, f"gated_delta_rule {what}")
        return self._op("gated_delta_rule", [q, k, v, a, b], {"A_log": A_log, "dt_bias": dt_bias},
                        {"layer": int(layer), "n_k_heads": int(n_k_heads), "n_v_heads": int(n_v_heads),
                         "k_dim": int(k_dim), "v_dim": int(v_dim)}, [n_v_heads * v_dim])

    def gated_rms_norm(self, x, z, w, n_heads, eps):
        self._check(x, None, "gated_rms_norm")
        self._check(z, x.width, "gated_rms_norm z")
        return self._op("gated_rms_norm", [x, z], {"w": w}, {"n_heads": int(n_heads), "eps": float(eps)},
                        [x.width])

    def lm_head(self, x, w):
        self._check(x, int(w.shape[1]), "lm_head")
        return self._op("lm_head", [x], {"w": w}, {}, [int(w.shape[0])])


def trace(cfg, weights):
    """Run the family's forward symbolically. Returns (tracer, logits Value)."""
    tracer = Tracer(weights)
    logits = family_for(cfg.model_type).forward(tracer, cfg, weights, tracer.ids)
    if not isinstance(logits, Value) or logits.op is None or logits.op.kind != "lm_head":
        raise UnsupportedModelError(f"{cfg.model_type}: forward must end with ops.lm_head")
    return tracer, logits


# ============================================================================================ fusion

@dataclass(eq=False)
class Kernel:
    """One dispatch before layout: a kernel family, the activations it reads and writes (roles ->
    Value), its weights (roles -> weight key), the per-sequence state it touches, and parameters."""
    kind: str
    reads: dict
    writes: dict
    weights: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)      # role -> (layer, "k" | "v" | "conv" | "ssm")
    params: dict = field(default_factory=dict)
    layer: int | None = None
    order: float = 0.0                             # trace position, to keep the model's order


def root(v: Value):
    """(root Value, feature offset) of a possibly nested view."""
    col = 0
    while v.src is not None:
        col += v.col
        v = v.src
    return v, col


class _Graph:
    def __init__(self, ops):
        self.ops = ops
        self.users = {}                 # id(root Value) -> ops reading it or any view of it
        self.direct = {}                # id(Value) -> ops reading exactly this Value
        for op in ops:
            for x in op.ins:
                self.direct.setdefault(id(x), []).append(op)
                r, _ = root(x)
                self.users.setdefault(id(r), []).append(op)
        self.done = set()               # ids of ops absorbed into kernels

    def only_user(self, v, op):
        """True when `op` is the one consumer of v (through views too)."""
        return v.src is None and self.users.get(id(v), []) == [op]


def _layer_of(names):
    for n in names:
        if n and n.startswith("model.layers."):
            return int(n.split(".")[2])
    return None


def fuse(ops, storage):
    """Op graph -> Kernels. `storage(name)` is the stored type of a weight ("q8", "q4", "f16",
    "f32"): only weights of one type are concatenated into one GEMV."""
    g = _Graph(ops)
    kernels = []

    def claim(*xs):
        for op in xs:
            g.done.add(id(op))

    # attention: [head_rms_norm] + rope on q and k, KV append; attention; [output gate]
    for op in ops:
        if op.kind != "attention":
            continue
        q, k, v = op.ins
        p = op.params
        srcs, norms, absorbed = {}, {}, []
        for role, x in (("q", q), ("k", k)):
            rope = x.op
            if rope is None or rope.kind != "rope" or not g.only_user(x, op):
                raise UnsupportedModelError(f"layer {p['layer']}: attention {role} must come from ops.rope")
            x = rope.ins[0]
            absorbed.append(rope)
            norms[role] = None
            if x.op is not None and x.op.kind == "head_rms_norm" and g.only_user(x, rope):
                norms[role] = x.op
                absorbed.append(x.op)
                x = x.op.ins[0]
            srcs[role] = x
        rope, k_rope = q.op, k.op
        if (rope.params["rotary_dim"], rope.weights["inv_freq"]) != (k_rope.params["rotary_dim"],
                                                                       k_rope.weights["inv_freq"]):
            raise UnsupportedModelError(f"layer {p['layer']}: q and k use different RoPE settings")
        qk_norm = norms["q"] or norms["k"]
        q_roped = Value(q.width)
        pre = Kernel("qk_rope_kv", reads={"q": srcs["q"], "k": srcs["k"], "v": v}, writes={"q_out": q_roped},
                     weights={"q_norm": norms["q"] and norms["q"].weights["w"],
                              "k_norm": norms["k"] and norms["k"].weights["w"],
                              "inv_freq": rope.weights["inv_freq"]},
                     state={"k_cache": (p["layer"], "k"), "v_cache": (p["layer"], "v")},
                     params=dict(n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"], head_dim=p["head_dim"],
                                 rotary_dim=rope.params["rotary_dim"],
                                 eps=qk_norm.params["eps"] if qk_norm else 0.0,
                                 add_one=qk_norm.params["add_one"] if qk_norm else False),
                     layer=p["layer"], order=op.index - 0.5)
        out = op.out[0]
        att = Kernel("attention", reads={"q": q_roped}, writes={"out": out},
                     state={"k_cache": (p["layer"], "k"), "v_cache": (p["layer"], "v")},
                     params=dict(n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"], head_dim=p["head_dim"],
                                 scale=p["scale"]), layer=p["layer"], order=op.index)
        users = g.direct.get(id(out), [])
        if len(users) == 1 and users[0].kind == "sigmoid_mul" and users[0].ins[0] is out and g.only_user(out, users[0]):
            gm = users[0]
            gate = gm.ins[1]
            att.writes["out"] = gm.out[0]
            claim(gm)
            # Qwen3.5: q_proj rows are per head [q | gate]; the rope kernel splits them
            qs, hd = srcs["q"], p["head_dim"]
            if (qs.heads == (p["n_heads"], 2 * hd, hd) and qs.col == 0 and gate.src is qs.src
                    and gate.col == hd and gate.heads == qs.heads):
                gate = Value(gate.width)
                pre.reads["q"] = qs.src
                pre.writes["gate_out"] = gate
                pre.params["split_gate"] = True
            att.reads["gate"] = gate
        if srcs["q"].heads is not None and not pre.params.get("split_gate"):
            raise UnsupportedModelError(f"layer {p['layer']}: per-head q split without an output gate")
        claim(op, *absorbed)
        kernels += [pre, att]

    # Gated DeltaNet: conv1d + SiLU, split, delta rule, gated norm: one kernel
    for op in ops:
        if op.kind != "gated_delta_rule":
            continue
        q, k, v, a, b = op.ins
        p = op.params
        conv = root(q)[0].op
        kd = p["n_k_heads"] * p["k_dim"]
        if (conv is None or conv.kind != "conv1d_silu" or not all(root(x) == (conv.out[0], c) for x, c in
                                                                      ((q, 0), (k, kd), (v, 2 * kd)))):
            raise UnsupportedModelError(f"layer {p['layer']}: gated_delta_rule q|k|v must be a split of conv1d_silu")
        users = g.direct.get(id(op.out[0]), [])
        if len(users) != 1 or users[0].kind != "gated_rms_norm":
            raise UnsupportedModelError(f"layer {p['layer']}: gated_delta_rule must feed gated_rms_norm")
        norm = users[0]
        kernels.append(Kernel(
            "gdn", reads={"qkv": conv.ins[0], "z": norm.ins[1], "a": a, "b": b}, writes={"out": norm.out[0]},
            weights={"conv": conv.weights["w"], "A_log": op.weights["A_log"], "dt_bias": op.weights["dt_bias"],
                     "norm": norm.weights["w"]},
            state={"conv_state": (p["layer"], "conv"), "ssm_state": (p["layer"], "ssm")},
            params=dict(n_k_heads=p["n_k_heads"], n_v_heads=p["n_v_heads"], k_dim=p["k_dim"], v_dim=p["v_dim"],
                        conv_kernel=conv.params["kernel"], eps=norm.params["eps"]),
            layer=p["layer"], order=norm.index))
        claim(op, conv, norm)

    # lm_head with the final norm as its prologue, then the sampler
    for op in ops:
        if op.kind != "lm_head":
            continue
        x, norm = op.ins[0], None
        if x.op is not None and x.op.kind == "rms_norm" and g.only_user(x, op):
            norm = x.op
            x = norm.ins[0]
            claim(norm)
        kernels.append(Kernel("lm_head", reads={"x": x}, writes={"logits": op.out[0]},
                              weights={"w": op.weights["w"], "norm": norm and norm.weights["w"]},
                              params=dict(eps=norm.params["eps"] if norm else 0.0,
                                          add_one=norm.params["add_one"] if norm else False),
                              order=op.index))
        kernels.append(Kernel("sample", reads={"logits": op.out[0]}, writes={}, order=op.index + 0.5))
        claim(op)

    # linears: one GEMV per (input, weight type); norm prologue; gate/up interleave; epilogues
    groups = {}
    for op in ops:
        if op.kind == "linear":
            groups.setdefault(id(op.ins[0]), []).append(op)
    for lins in groups.values():
        x, norm = lins[0].ins[0], None
        readers = g.direct.get(id(x), [])
        if (x.op is not None and x.op.kind == "rms_norm" and x.src is None and
                all(u.kind == "linear" for u in readers) and len(g.users[id(x)]) == len(readers)):
            norm = x.op
            claim(norm)
        src = norm.ins[0] if norm else x
        prologue = dict(norm=norm and norm.weights["w"],
                        eps=norm.params["eps"] if norm else 0.0, add_one=norm.params["add_one"] if norm else False)
        rest = list(lins)
        # gate/up pairs feeding one silu_mul
        for op in lins:
            users = g.direct.get(id(op.out[0]), [])
            if len(users) != 1 or users[0].kind != "silu_mul" or id(users[0]) in g.done:
                continue
            sm = users[0]
            gate, up = (o.op for o in sm.ins)
            if (gate in rest and up in rest and gate is not up and all(g.only_user(o, sm) for o in sm.ins)
                    and not gate.weights["bias"] and not up.weights["bias"]
                    and storage(gate.weights["w"]) == storage(up.weights["w"])):
                rest.remove(gate)
                rest.remove(up)
                kernels.append(Kernel("gemv", reads={"x": src}, writes={"out": sm.out[0]},
                                      weights={"w": ("interleave", gate.weights["w"], up.weights["w"]),
                                               "norm": prologue["norm"], "bias": None},
                                      params=dict(prologue, epilogue="silu_mul", rows=sm.out[0].width),
                                      layer=_layer_of([gate.weights["w"]]), order=sm.index))
                claim(gate, up, sm)
        by_type = {}
        for op in rest:
            by_type.setdefault(storage(op.weights["w"]), []).append(op)
        for parts in by_type.values():
            names = [op.weights["w"] for op in parts]
            biases = [op.weights["bias"] for op in parts]
            layer = _layer_of(names)
            if len(parts) == 1:
                op = parts[0]
                out, resid, order = op.out[0], None, op.index
                users = g.direct.get(id(out), [])
                if len(users) == 1 and users[0].kind == "add" and g.only_user(out, users[0]):
                    add = users[0]
                    resid = add.ins[0] if add.ins[1] is out else add.ins[1]
                    out, order = add.out[0], add.index
                    claim(add)
                kernels.append(Kernel("gemv", reads={"x": src, **({"resid": resid} if resid else {})},
                                      writes={"out": out},
                                      weights={"w": names[0], "norm": prologue["norm"], "bias": biases[0]},
                                      params=dict(prologue, epilogue="residual" if resid else "none",
                                                  rows=out.width),
                                      layer=layer, order=order))
            else:
                rows = sum(op.out[0].width for op in parts)
                out, col = Value(rows), 0
                for op in parts:            # each linear's output becomes a view of the joint output
                    op.out[0].src, op.out[0].col = out, col
                    col += op.out[0].width
                kernels.append(Kernel("gemv", reads={"x": src}, writes={"out": out},
                                      weights={"w": ("concat", *names), "norm": prologue["norm"],
                                               "bias": ("concat", *biases) if any(biases) else None},
                                      params=dict(prologue, epilogue="none", rows=rows),
                                      layer=layer, order=max(op.index for op in parts)))
            claim(*parts)

    for op in ops:
        if op.kind == "embed":
            kernels.append(Kernel("embed", reads={}, writes={"out": op.out[0]},
                                  weights={"table": op.weights["table"]}, order=op.index))
            claim(op)
    left = [op for op in ops if id(op) not in g.done]
    for op in left:
        if op.kind == "rms_norm":
            kernels.append(Kernel("rms_norm", reads={"x": op.ins[0]}, writes={"out": op.out[0]},
                                  weights={"w": op.weights["w"]}, params=dict(op.params), order=op.index))
        elif op.kind in ("add", "silu_mul", "sigmoid_mul"):
            kernels.append(Kernel("elementwise", reads={"a": op.ins[0], "b": op.ins[1]}, writes={"out": op.out[0]},
                                  params={"op": op.kind}, order=op.index))
        else:
            raise UnsupportedModelError(f"no kernel for ops.{op.kind} in this context (op #{op.index})")
        claim(op)
    return _schedule(kernels)


def _schedule(kernels):
    """Topological order (a kernel after every kernel writing what it reads), ties by trace order."""
    writer = {}
    for kern in kernels:
        for v in kern.writes.values():
            writer[id(root(v)[0])] = kern
    deps = {id(k): {id(writer[id(root(v)[0])]) for v in k.reads.values()
                    if v is not None and id(root(v)[0]) in writer} for k in kernels}
    out, placed = [], set()
    pending = sorted(kernels, key=lambda k: k.order)
    while pending:
        for k in pending:
            if deps[id(k)] <= placed:
                break
        else:
            raise UnsupportedModelError("the traced graph has a cycle")
        pending.remove(k)
        placed.add(id(k))
        out.append(k)
    return out


# ============================================================================================ layout

def _align(n, a=64):
    return (n + a - 1) // a * a


def aligned_zeros(nbytes, align=64):
    """A zeroed uint8 array whose data pointer is a multiple of align. np.zeros maps fresh pages
    lazily, so a large KV cache costs resident memory only as it fills."""
    buf = np.zeros(max(nbytes, 1) + align, np.uint8)
    start = -buf.ctypes.data % align
    return buf[start:start + max(nbytes, 1)]


def layout_scratch(kernels, rows, skip=()):
    """Byte offsets in SCRATCH for every activation root written by `kernels` ([rows, width] f32
    each), reusing space by liveness: a block is free again once the last kernel reading it has
    run. Roots in `skip` live elsewhere. Returns ({id(root): offset}, arena size).

    A qk_rope_kv's inputs stay live through the attention right after it: a backend may run the
    two as one kernel (CUDA does at decode), whose attention output must then not land on q, k or
    v while other blocks still read them."""
    last = {}
    for i, kern in enumerate(kernels):
        fused_next = kern.kind == "qk_rope_kv" and i + 1 < len(kernels) and kernels[i + 1].kind == "attention"
        for v in kern.reads.values():
            if v is not None:
                last[id(root(v)[0])] = i + fused_next
    offsets, live, size = {}, [], 0          # live: [offset, nbytes, last reader]
    for i, kern in enumerate(kernels):
        live = [blk for blk in live if blk[2] >= i]
        for v in kern.writes.values():
            r = root(v)[0]
            if id(r) in offsets or id(r) in skip:
                continue
            need = _align(rows * r.width * 4)
            off = 0
            for blk_off, blk_size, _ in sorted(live):      # first fit between live blocks
                if off + need <= blk_off:
                    break
                off = max(off, blk_off + blk_size)
            offsets[id(r)] = off
            live.append([off, need, last.get(id(r), i)])
            size = max(size, off + need)
    return offsets, size


def needs_barrier(accesses):
    """accesses[i]: list of (arena, start, end, writes) of dispatch i. Returns a flag per dispatch:
    True when it touches bytes that a dispatch since the last barrier wrote (read-after-write,
    write-after-write), or writes bytes one of them read (write-after-read). The first dispatch
    always waits: it reads the step-args the previous step's sampler wrote."""
    flags, pending = [], []
    for acc in accesses:
        hazard = not flags or any(
            a == pa and s < pe and ps < e and (w or pw)
            for a, s, e, w in acc for pa, ps, pe, pw in pending)
        if hazard:
            pending = []
        pending += acc
        flags.append(hazard)
    return flags


# ============================================================================================ C layouts
# numpy mirrors of metal/lattice_shared.h (tests/test_program.py checks every offset against the C
# compiler's offsetof).

def _struct(fields):
    return np.dtype([(n, t) for n, t in fields], align=True)


U32, F32 = "<u4", "<f4"
ARENA = {"weights": 0, "state": 1, "scratch": 2, "step": 3, "output": 4, "const": 5}
N_ARENAS = 6
ARENA_NONE = 0xFFFFFFFF
MAX_BIND = 12
ARGS_ALIGN = 16
BARRIER = 1
WF = {"f32": 0, "f16": 1, "q8": 2, "q4": 3}
KERNEL_ID = {"embed": 1, "rms_norm": 2, "gemv": 3, "qk_rope_kv": 4, "attention": 5, "gdn": 6,
             "elementwise": 7, "lm_head": 8, "sample": 9}
KERNEL_NAME = {v: k for k, v in KERNEL_ID.items()}
ERRORS = {1: "NaN or Inf in logits", 2: "token id out of range", 3: "position beyond the KV cache",
          4: "unknown kernel", 5: "binding outside its arena", 6: "invalid kernel arguments",
          7: "out of memory"}

BINDING_DTYPE = _struct([("arena", U32), ("offset", U32)])
DISPATCH_DTYPE = _struct([("kernel", U32), ("flags", U32), ("args_offset", U32), ("n_bind", U32),
                          ("grid", (U32, 3)), ("group", (U32, 3)), ("bind", (BINDING_DTYPE, MAX_BIND))])
STEP_DTYPE = _struct([(n, F32 if n in ("temperature", "top_p", "min_p", "repetition_penalty",
                                       "presence_penalty", "frequency_penalty", "next_logprob") else U32)
                      for n in ("pos", "token", "n_tokens", "step", "ring_cap", "flags", "seed_lo", "seed_hi",
                                "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                "presence_penalty", "frequency_penalty", "penalty_last_n", "n_seen", "error",
                                "next_token", "next_logprob")] + [("pad", (U32, 4))])
ARGMAX_PARTIAL_DTYPE = _struct([("max", F32), ("argmax", U32), ("sumexp", F32), ("n_nonfinite", U32)])
ARGMAX_BLOCK = 256
STEP_WANT_LOGITS = 1

ARGS_DTYPES = {
    "embed": ("lt_embed_args", _struct([("wformat", U32), ("dim", U32), ("vocab", U32), ("out_stride", U32),
                                        ("scale", F32), ("pad", (U32, 3))])),
    "rms_norm": ("lt_rmsnorm_args", _struct([("n_heads", U32), ("head_dim", U32), ("in_stride", U32),
                                             ("out_stride", U32), ("z_stride", U32), ("flags", U32),
                                             ("eps", F32), ("pad", U32)])),
    "gemv": ("lt_gemv_args", _struct([("wformat", U32), ("rows", U32), ("cols", U32), ("flags", U32),
                                      ("x_stride", U32), ("y_stride", U32), ("resid_stride", U32),
                                      ("eps", F32)])),
    "qk_rope_kv": ("lt_rope_kv_args", _struct([(n, U32) for n in (
        "n_heads", "n_kv_heads", "head_dim", "rotary_dim", "q_stride", "k_stride", "v_stride", "q_out_stride",
        "gate_stride", "ctx_cap", "flags")] + [("eps", F32)])),
    "attention": ("lt_attention_args", _struct([(n, U32) for n in (
        "n_heads", "n_kv_heads", "head_dim", "ctx_cap", "q_stride", "out_stride", "gate_stride", "flags")]
        + [("scale", F32), ("pad", (U32, 3))])),
    "gdn": ("lt_gdn_args", _struct([(n, U32) for n in (
        "n_k_heads", "n_v_heads", "k_dim", "v_dim", "conv_kernel", "channels", "q_offset", "k_offset",
        "v_offset", "x_stride", "z_stride", "a_stride", "b_stride", "out_stride")]
        + [("norm_eps", F32), ("pad", U32)])),
    "elementwise": ("lt_elementwise_args", _struct([(n, U32) for n in (
        "op", "n", "a_stride", "b_stride", "out_stride")] + [("pad", (U32, 3))])),
    "sample": ("lt_sample_args", _struct([(n, U32) for n in (
        "vocab", "logits_stride", "flags", "hist_cap", "logits_cap")] + [("pad", (U32, 3))])),
}
ARGS_DTYPES["lm_head"] = ARGS_DTYPES["gemv"]
C_STRUCTS = {"lt_binding": BINDING_DTYPE, "lt_dispatch": DISPATCH_DTYPE, "lt_step_args": STEP_DTYPE,
             "lt_argmax_partial": ARGMAX_PARTIAL_DTYPE, **{c: d for c, d in ARGS_DTYPES.values()}}

# binding slots per kernel (the LT_*_B_* enums)
SLOTS = {
    "embed": ("ids", "out", "wq", "ws", "wm"),
    "rms_norm": ("x", "out", "w", "z"),
    "gemv": ("x", "out", "wq", "ws", "wm", "norm", "bias", "resid", "partials"),
    "qk_rope_kv": ("q", "k", "v", "q_out", "k_cache", "v_cache", "inv_freq", "q_norm", "k_norm", "gate_out"),
    "attention": ("q", "out", "k_cache", "v_cache", "gate"),
    "gdn": ("qkv", "z", "a", "b", "out", "conv", "conv_state", "A_log", "dt_bias", "ssm_state", "norm"),
    "elementwise": ("a", "b", "out"),
    "sample": ("logits", "partials", "ids", "counts", "hist", "ring_tokens", "ring_logprobs", "work",
               "ring_logits"),
}
SLOTS["lm_head"] = SLOTS["gemv"]
GEMV_FLAG = {"norm": 1, "add_one": 2, "bias": 4, "silu_mul": 8, "resid": 16, "all_tokens": 32}
EW_OP = {"add": 0, "silu_mul": 1, "sigmoid_mul": 2, "copy": 3}

# GPU launch shapes (threadgroups, threads per group) per kernel: Metal/CUDA read them, the CPU
# ignores them. Rows per group for the GEMVs follow DESIGN.md (>= 32 rows per group on lm_head).
GEMV_ROWS_PER_GROUP = {"gemv": 8, "lm_head": 32}


def _launch(kind, a, rows):
    if kind in ("gemv", "lm_head"):
        return (-(-a["rows"] // GEMV_ROWS_PER_GROUP[kind]), 1, 1), (256, 1, 1)
    if kind == "qk_rope_kv":
        return (a["n_heads"] + 2 * a["n_kv_heads"], rows, 1), (64, 1, 1)
    if kind == "attention":
        return (a["n_heads"], rows, 1), (256, 1, 1)
    if kind == "gdn":
        return (a["n_v_heads"], 1, 1), (128, 1, 1)
    if kind == "sample":
        return (1, 1, 1), (1024, 1, 1)
    return (rows, 1, 1), (256, 1, 1)


# ============================================================================================ weights

QUANT_MODES = (None, "q8", "q4")
_EXACT_NATIVE = {"f32": "f32", "f16": "f16", "bf16": "f32", "q8_0": "q8", "q4_0": "q4", "q4_1": "q4"}


class WeightStore:
    """Places every weight the kernels bind in the WEIGHTS arena, converted once: matrices to the
    quant mode's format (None: the native format where the conversion is exact — f32/f16 kept,
    bf16 -> f32, GGUF Q8_0 -> Q8, Q4_0/Q4_1 and MLX 4-bit -> Q4 — anything else -> Q8), vectors to
    f32. Composite keys build joint matrices: ("concat", a, b, ...) stacks rows, ("interleave",
    gate, up) alternates them (row 2i = gate i, row 2i+1 = up i)."""

    def __init__(self, tensors, derived, quant):
        if quant not in QUANT_MODES:
            raise ConfigError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
        self.tensors, self.derived, self.quant = tensors, derived, quant
        self.entries = {}       # key -> dict(format, rows, cols, planes {slot: (offset, nbytes)})
        self.size = 0

    def format_of(self, name):
        if name in self.derived:
            return "f32"
        t = self.tensors[name]
        if len(t.shape) != 2:
            return "f32"
        if self.quant:
            return self.quant
        if t.dtype == "mlx_q4" and t.group_size % 32 == 0:
            return "q4"
        return _EXACT_NATIVE.get(t.dtype, "q8")

    def _shape(self, name):
        return tuple(self.derived[name].shape) if name in self.derived else tuple(self.tensors[name].shape)

    def place(self, key):
        """Reserve space for a weight (or joint weight); returns its entry."""
        if key in self.entries:
            return self.entries[key]
        if isinstance(key, tuple) and key[0] in ("concat", "interleave"):
            parts = [p for p in key[1:]]
            fmt = self.format_of(next(p for p in parts if p))
            vector = len(self._shape(next(p for p in parts if p))) == 1
            if vector:                                  # joint bias (concat only): missing parts are zeros
                rows = sum(self._shape(p)[0] if p else 0 for p in parts)
                cols = 1
            else:
                rows, cols = sum(self._shape(p)[0] for p in parts), self._shape(parts[0])[1]
        else:
            fmt, shape = self.format_of(key), self._shape(key)
            vector = len(shape) != 2
            rows, cols = (int(np.prod(shape)), 1) if vector else shape
        if vector:
            fmt = "f32"
        kp = -(-cols // 32) * 32
        plane_bytes = {"f32": [rows * cols * 4], "f16": [rows * cols * 2], "q8": [rows * kp, rows * kp // 16],
                       "q4": [rows * kp // 2, rows * kp // 16, rows * kp // 16]}[fmt]
        planes = {}
        for slot, nbytes in zip(("wq", "ws", "wm"), plane_bytes):
            self.size = _align(self.size, 64)
            planes[slot] = (self.size, nbytes)
            self.size += nbytes
        entry = self.entries[key] = dict(format=fmt, rows=rows, cols=cols, planes=planes, key=key)
        return entry

    # filling -----------------------------------------------------------------------------------
    def fill(self):
        """Convert every placed weight into one 64-byte aligned uint8 array (the WEIGHTS arena).

        Peak memory stays near the arena's size: each matrix is converted in chunks of rows written
        straight into its planes (temporaries of a few MB, whatever the matrix), and a checkpoint
        tensor that can `release()` gives back the file pages of converted rows chunk by chunk,
        and all its pages and any loaded copy after its last use, so the converted checkpoint
        does not stay resident next to the arena."""
        blob = aligned_zeros(self.size)
        last_use = {}
        for i, key in enumerate(self.entries):
            for name in key[1:] if isinstance(key, tuple) else (key,):
                if name:
                    last_use[name] = i
        for i, (key, e) in enumerate(self.entries.items()):
            kind, parts = (key[0], key[1:]) if isinstance(key, tuple) else ("concat", (key,))
            views = [blob[off:off + nbytes].view(dtype).reshape(e["rows"], -1) for (off, nbytes), dtype
                     in zip(e["planes"].values(), PLANE_DTYPES[e["format"]])]
            row = 0
            for j, name in enumerate(parts):
                if e["cols"] == 1:              # f32 vector; a joint bias holds the parts present
                    n = int(np.prod(self._shape(name))) if name else 0
                    if name:
                        _put(views[0][row:row + n], self._f32(name).reshape(n, 1), name)
                    row += n
                    continue
                n = self._shape(name)[0]
                rows = slice(j, None, len(parts)) if kind == "interleave" else slice(row, row + n)
                self._convert(name, e["format"], [v[rows] for v in views])
                row += n
            for name in parts:
                if name and last_use[name] == i:
                    release = getattr(self.tensors.get(name), "release", None)
                    if release is not None:
                        release()
        return blob

    def _f32(self, name):
        return self.derived[name] if name in self.derived else self.tensors[name].to_f32()

    def _convert(self, name, fmt, planes):
        """Write matrix `name` in format fmt into its plane views ([rows, plane width] each)."""
        if name in self.derived:                # f32 by format_of
            _put(planes[0], self.derived[name], name)
            return
        from .formats.tensor import f32_rows
        from .quant import from_tensor
        t = self.tensors[name]
        release = getattr(t, "release", None)
        n, k = t.shape
        step = max(1, CONVERT_CHUNK_BYTES // (4 * k))
        for start in range(0, n, step):
            stop = min(n, start + step)
            if fmt == "f32":
                chunk = [f32_rows(t, start, stop)]
            elif fmt == "f16":
                chunk = [t.raw[start:stop] if t.dtype == "f16"
                         else f32_rows(t, start, stop).astype(np.float16)]
            else:
                qm = from_tensor(t, fmt, start, stop)
                chunk = [qm.qs, qm.scales] + ([qm.mins] if fmt == "q4" else [])
            for plane, values in zip(planes, chunk):
                _put(plane[start:stop], values, name)
            if release is not None:         # a large matrix's converted rows leave memory early
                release(start, stop)


# the planes of each weight format, in slot order (wq, ws, wm), as [rows, plane width] arrays
PLANE_DTYPES = {"f32": (np.float32,), "f16": (np.float16,), "q8": (np.int8, np.float16),
                "q4": (np.uint8, np.float16, np.float16)}
CONVERT_CHUNK_BYTES = 1 << 20     # float32 size of the rows converted at once


def _put(dst, src, name):
    src = np.asarray(src)
    if src.dtype != dst.dtype or src.size != dst.size:
        raise AssertionError(f"{name}: weight plane {src.dtype} {src.shape} where "
                             f"{dst.dtype} {dst.shape} was planned")
    dst[...] = src.reshape(dst.shape)


# ============================================================================================ program

VARIANTS = ("decode", "prefill", "logits")


class ShapeOnlyTensor:
    """A weight known only by its shape: lets a program be built (stats, dump, layout) from a
    config alone, without converting or even having weights."""

    def __init__(self, name, shape):
        self.name, self.shape, self.dtype = name, tuple(shape), "f32"

    def to_f32(self):
        raise ConfigError(f"{self.name}: a shape-only program has no weight values")


class ShapeOnlyCheckpoint:
    def __init__(self, cfg):
        self.config = cfg
        self.tensors = {n: ShapeOnlyTensor(n, s) for n, s in family_for(cfg.model_type).expected_weights(cfg).items()}


class Program:
    """A compiled model: three dispatch arrays over one set of arenas.

    - `decode`: one token per replay (T = 1); its sampler feeds the next replay;
    - `prefill`: up to `prefill_chunk` prompt tokens per run (step.n_tokens), logits of the last;
    - `logits`: up to `logits_chunk` tokens per run with every token's logits (teacher forcing).

    `consts` is the CONST arena, `weights` the WEIGHTS arena (None for a shape-only build);
    `sizes[arena]` gives the bytes a session allocates for STATE, SCRATCH, STEP and OUTPUT, and
    `layout` where the host finds things in them (penalty counts, token ids, the rings, logits)."""

    def __init__(self, config, quant, context, prefill_chunk, logits_chunk):
        self.config, self.quant, self.context = config, quant, context
        self.prefill_chunk, self.logits_chunk = prefill_chunk, logits_chunk
        self.dispatches = {}        # variant -> np.ndarray[DISPATCH_DTYPE]
        self.notes = {}             # variant -> per dispatch (kernel label, layer, args dict, binding roles)
        self.accesses = {}          # variant -> per dispatch [(arena, start, end, writes)], for barriers
        self.consts = None
        self.weights = None
        self.sizes = {}
        self.layout = {}
        self.recurrent = "linear_attention" in config.layer_types
        self.weight_entries = {}    # weight key -> format, shape and plane offsets in WEIGHTS

    @property
    def vocab(self):
        return self.config.vocab_size

    def reusable_prefix(self, history, ids) -> int:
        """How many leading tokens of ids a session whose cache holds `history` can keep.
        Attention-only programs keep the longest common prefix (later KV entries are overwritten);
        a recurrent state cannot rewind, so it is kept only when ids extend the whole history.
        At least one token of ids is always left to prefill (its logits give the next token)."""
        if self.recurrent:
            return len(history) if len(history) < len(ids) and ids[:len(history)] == history else 0
        n, reuse = min(len(history), len(ids) - 1), 0
        while reuse < n and history[reuse] == ids[reuse]:
            reuse += 1
        return reuse

    def stats(self, variant="decode"):
        """Dispatch counts of one replay: total, barriers, per kernel, and per layer type (total
        and per layer), plus those outside the layers (embed, lm_head, sample)."""
        d = self.dispatches[variant]
        notes = self.notes[variant]
        per_type, per_kernel, outside = {}, {}, 0
        for kernel, layer, _, _ in notes:
            per_kernel[kernel] = per_kernel.get(kernel, 0) + 1
            if layer is None:
                outside += 1
            else:
                t = per_type.setdefault(self.config.layer_types[layer], {"layers": set(), "dispatches": 0})
                t["layers"].add(layer)
                t["dispatches"] += 1
        for t in per_type.values():
            t["layers"] = len(t["layers"])
            t["per_layer"] = t["dispatches"] / t["layers"]
        return {"dispatches": int(len(d)), "barriers": int(np.count_nonzero(d["flags"] & BARRIER)),
                "per_kernel": per_kernel, "per_layer_type": per_type, "outside_layers": outside}

    def dump(self, variant="decode"):
        """One line per dispatch: index, B when it waits at a barrier, kernel, layer, key args,
        bindings as role=ARENA+offset."""
        letters = "WTSPOC"
        lines = [f"# {variant} program: {len(self.dispatches[variant])} dispatches, "
                 f"{self.config.model_type}, quant={self.quant}, context={self.context}"]
        for i, (rec, (kernel, layer, args, roles)) in enumerate(zip(self.dispatches[variant], self.notes[variant])):
            binds = " ".join(f"{r}={letters[b['arena']]}+{b['offset']:#x}"
                             for r, b in zip(roles, rec["bind"][:rec["n_bind"]]) if b["arena"] != ARENA_NONE)
            shown = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in args.items()
                             if k != "pad" and v not in (0, 0.0))
            lines.append(f"{i:4d} {'B' if rec['flags'] & BARRIER else ' '} {kernel:<11} "
                         f"{'L' + str(layer) if layer is not None else '-':<4} {shown} | {binds}")
        return "\n".join(lines)


def build(ckpt, quant=None, context=4096, prefill_chunk=64, logits_chunk=16, materialize=True):
    """Compile a checkpoint (anything with `.config` and `.tensors`) into a Program.

    quant: "q8", "q4" or None (native formats where exact; see WeightStore). context: positions
    in each session's KV cache. materialize=False skips weight conversion (shape-only builds)."""
    cfg = ckpt.config
    if not isinstance(context, int) or context < 1:
        raise ConfigError(f"context must be a positive integer, got {context!r}")
    for name, v in (("prefill_chunk", prefill_chunk), ("logits_chunk", logits_chunk)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    check_weights(ckpt)
    tracer, logits = trace(cfg, ckpt.tensors)
    store = WeightStore(ckpt.tensors, tracer.derived, quant)
    kernels = fuse(tracer.ops, store.format_of)
    prog = Program(cfg, quant, context, prefill_chunk, logits_chunk)
    _layout_state(prog, cfg)
    consts = bytearray()
    scratch = 0
    for variant, rows in (("decode", 1), ("prefill", prefill_chunk), ("logits", logits_chunk)):
        recs, notes, size, accesses = _emit(prog, kernels, store, logits, variant, rows, consts)
        prog.dispatches[variant], prog.notes[variant], prog.accesses[variant] = recs, notes, accesses
        scratch = max(scratch, size)
    prog.sizes["scratch"] = scratch
    prog.consts = np.frombuffer(bytes(consts), dtype=np.uint8).copy()
    prog.sizes["weights"] = store.size
    if store.size >= 2**32:
        raise ConfigError(f"weights need {store.size} bytes; binding offsets are 32-bit (4 GiB)")
    prog.weight_entries = store.entries
    if materialize:
        prog.weights = store.fill()
    return prog


def _layout_state(prog, cfg):
    """STATE: penalty counts and history, each attention layer's KV cache (f16), then every GDN
    layer's conv + recurrent state (f32) in one span ("recurrent"), and a copy of that span for
    the runtime ("recurrent_copy": the snapshot it rewinds to), so that resetting or copying them
    is one backend call. STEP: step-args, then the prompt chunk's token ids. OUTPUT: token and
    logprob rings, then logits rows."""
    v, ctx = cfg.vocab_size, prog.context
    lay, off = {}, 0

    def take(key, nbytes):
        nonlocal off
        off = _align(off)
        lay[key] = (off, nbytes)
        off += nbytes

    take("counts", 4 * v)
    take("hist", 4 * ctx)
    specs = list(enumerate(family_for(cfg.model_type).state_shapes(cfg)))
    for layer, spec in specs:
        if isinstance(spec, KVCache):
            take((layer, "k"), 2 * ctx * spec.width)
            take((layer, "v"), 2 * ctx * spec.width)
    start = off = _align(off)
    for layer, spec in specs:
        if isinstance(spec, DeltaNetState):
            take((layer, "conv"), 4 * int(np.prod(spec.conv)))
            take((layer, "ssm"), 4 * int(np.prod(spec.recurrent)))
    if off > start:
        lay["recurrent"] = (start, off - start)
        take("recurrent_copy", off - start)
    prog.sizes["state"] = _align(off)
    prog.layout.update({"state": lay, "hist_cap": ctx})
    ids_off = _align(STEP_DTYPE.itemsize)
    prog.layout["ids"] = ids_off
    prog.sizes["step"] = ids_off + 4 * max(prog.prefill_chunk, prog.logits_chunk)
    ring = 256
    prog.layout.update({"ring_cap": ring, "ring_tokens": 0, "ring_logprobs": 4 * ring,
                        "logits": _align(8 * ring)})
    prog.sizes["output"] = prog.layout["logits"] + 4 * v * max(1, prog.logits_chunk)


def _emit(prog, kernels, store, logits_value, variant, rows, consts):
    """Kernels -> dispatch records for one variant (rows = tokens per run at most)."""
    v = prog.vocab
    out_logits = id(root(logits_value)[0])
    scr, size = layout_scratch(kernels, rows, skip={out_logits})
    partials_off = _align(size)
    work_off = _align(partials_off + ARGMAX_PARTIAL_DTYPE.itemsize * -(-v // ARGMAX_BLOCK))
    size = work_off + 8 * v
    state = prog.layout["state"]
    ids = (ARENA["step"], 4 if variant == "decode" else prog.layout["ids"])
    step_bytes = (ARENA["step"], 0, STEP_DTYPE.itemsize, False)

    def act(val):
        """(binding, row stride in floats, access range) of an activation."""
        r, col = root(val)
        if id(r) == out_logits:
            arena, base = ARENA["output"], prog.layout["logits"]
        else:
            arena, base = ARENA["scratch"], scr[id(r)]
        off = base + 4 * col
        end = base + 4 * ((rows - 1) * r.width + col + val.width)
        return (arena, off), r.width, (arena, off, end)

    def state_region(key):
        off, nbytes = state[key]
        return (ARENA["state"], off), (ARENA["state"], off, off + nbytes)

    recs = np.zeros(len(kernels), DISPATCH_DTYPE)
    notes, accesses = [], []
    for i, kern in enumerate(kernels):
        kind = kern.kind
        args = np.zeros((), ARGS_DTYPES[kind][1])
        bind, acc = {}, [step_bytes]

        def read(role, val, stride_field=None):
            b, stride, rng = act(val)
            bind[role] = b
            acc.append(rng + (False,))
            if stride_field:
                args[stride_field] = stride

        def write(role, val, stride_field=None):
            b, stride, rng = act(val)
            bind[role] = b
            acc.append(rng + (True,))
            if stride_field:
                args[stride_field] = stride

        def weight(key, prefix=""):
            e = store.place(key)
            for slot, (off, _) in e["planes"].items():
                bind[prefix + slot if prefix else slot] = (ARENA["weights"], off)
            return e

        def vec(role, key):
            if key:
                bind[role] = (ARENA["weights"], store.place(key)["planes"]["wq"][0])

        if kind == "embed":
            e = weight(kern.weights["table"])
            args["wformat"], args["dim"], args["vocab"], args["scale"] = WF[e["format"]], e["cols"], e["rows"], 1.0
            bind["ids"] = ids
            write("out", kern.writes["out"], "out_stride")
        elif kind in ("gemv", "lm_head"):
            p = kern.params
            e = weight(kern.weights["w"])
            flags = 0
            if kern.weights.get("norm"):
                flags |= GEMV_FLAG["norm"] | (GEMV_FLAG["add_one"] if p["add_one"] else 0)
                vec("norm", kern.weights["norm"])
                args["eps"] = p["eps"]
            if kern.weights.get("bias"):
                flags |= GEMV_FLAG["bias"]
                vec("bias", kern.weights["bias"])
            if p.get("epilogue") == "silu_mul":
                flags |= GEMV_FLAG["silu_mul"]
            if p.get("epilogue") == "residual":
                flags |= GEMV_FLAG["resid"]
                read("resid", kern.reads["resid"], "resid_stride")
            read("x", kern.reads["x"], "x_stride")
            if kind == "lm_head":
                if variant == "logits":
                    flags |= GEMV_FLAG["all_tokens"]
                off = prog.layout["logits"]
                n_out = rows if variant == "logits" else 1
                bind["out"] = (ARENA["output"], off)
                args["y_stride"] = v
                acc.append((ARENA["output"], off, off + 4 * v * n_out, True))
                bind["partials"] = (ARENA["scratch"], partials_off)
                acc.append((ARENA["scratch"], partials_off, work_off, True))
            else:
                write("out", kern.writes["out"], "y_stride")
            args["wformat"], args["rows"], args["cols"], args["flags"] = WF[e["format"]], e["rows"], e["cols"], flags
        elif kind == "qk_rope_kv":
            p = kern.params
            flags = (4 if p.get("split_gate") else 0)
            if kern.weights["q_norm"] or kern.weights["k_norm"]:
                flags |= 1 | (2 if p["add_one"] else 0)
                vec("q_norm", kern.weights["q_norm"])
                vec("k_norm", kern.weights["k_norm"])
            read("q", kern.reads["q"], "q_stride")
            read("k", kern.reads["k"], "k_stride")
            read("v", kern.reads["v"], "v_stride")
            write("q_out", kern.writes["q_out"], "q_out_stride")
            if "gate_out" in kern.writes:
                write("gate_out", kern.writes["gate_out"], "gate_stride")
            for role in ("k_cache", "v_cache"):
                bind[role], rng = state_region(kern.state[role])
                acc.append(rng + (True,))
            vec("inv_freq", kern.weights["inv_freq"])
            for f in ("n_heads", "n_kv_heads", "head_dim", "rotary_dim", "eps"):
                args[f] = p[f]
            args["ctx_cap"], args["flags"] = prog.context, flags
        elif kind == "attention":
            p = kern.params
            read("q", kern.reads["q"], "q_stride")
            write("out", kern.writes["out"], "out_stride")
            if "gate" in kern.reads:
                read("gate", kern.reads["gate"], "gate_stride")
                args["flags"] = 1
            for role in ("k_cache", "v_cache"):
                bind[role], rng = state_region(kern.state[role])
                acc.append(rng + (False,))
            for f in ("n_heads", "n_kv_heads", "head_dim", "scale"):
                args[f] = p[f]
            args["ctx_cap"] = prog.context
        elif kind == "gdn":
            p = kern.params
            read("qkv", kern.reads["qkv"], "x_stride")
            for role in ("z", "a", "b"):
                read(role, kern.reads[role], role + "_stride")
            write("out", kern.writes["out"], "out_stride")
            for role in ("conv_state", "ssm_state"):
                bind[role], rng = state_region(kern.state[role])
                acc.append(rng + (True,))
            for role in ("conv", "A_log", "dt_bias", "norm"):
                vec(role, kern.weights[role])
            kd = p["n_k_heads"] * p["k_dim"]
            for f in ("n_k_heads", "n_v_heads", "k_dim", "v_dim"):
                args[f] = p[f]
            args["conv_kernel"], args["channels"] = p["conv_kernel"], kern.reads["qkv"].width
            args["q_offset"], args["k_offset"], args["v_offset"] = 0, kd, 2 * kd
            args["norm_eps"] = p["eps"]
        elif kind == "sample":
            lo = prog.layout
            bind["logits"] = (ARENA["output"], lo["logits"])
            n_rows = rows if variant == "logits" else 1
            acc.append((ARENA["output"], lo["logits"], lo["logits"] + 4 * v * n_rows, False))
            bind["partials"] = (ARENA["scratch"], partials_off)
            acc.append((ARENA["scratch"], partials_off, work_off, False))
            bind["ids"] = ids
            bind["counts"], rng = state_region("counts")
            acc.append(rng + (True,))
            bind["hist"], rng = state_region("hist")
            acc.append(rng + (True,))
            bind["ring_tokens"] = (ARENA["output"], lo["ring_tokens"])
            bind["ring_logprobs"] = (ARENA["output"], lo["ring_logprobs"])
            acc.append((ARENA["output"], 0, lo["logits"], True))
            bind["work"] = (ARENA["scratch"], work_off)
            acc.append((ARENA["scratch"], work_off, work_off + 8 * v, True))
            acc.append(step_bytes[:3] + (True,))
            args["vocab"], args["logits_stride"], args["hist_cap"] = v, v, lo["hist_cap"]
            args["flags"] = 1 if variant == "logits" else 0
        elif kind == "rms_norm":
            p = kern.params
            read("x", kern.reads["x"], "in_stride")
            write("out", kern.writes["out"], "out_stride")
            vec("w", kern.weights["w"])
            args["n_heads"], args["head_dim"] = 1, kern.reads["x"].width
            args["flags"], args["eps"] = 1 if p["add_one"] else 0, p["eps"]
        elif kind == "elementwise":
            read("a", kern.reads["a"], "a_stride")
            read("b", kern.reads["b"], "b_stride")
            write("out", kern.writes["out"], "out_stride")
            args["op"], args["n"] = EW_OP[kern.params["op"]], kern.writes["out"].width
        else:
            raise UnsupportedModelError(f"no kernel for {kind}")
        if kind in ("embed",):
            acc.append((ARENA["step"],) + (ids[1], ids[1] + 4 * rows, False))

        slots = SLOTS[kind]
        rec = recs[i]
        rec["kernel"] = KERNEL_ID[kind]
        used = [slots.index(r) for r in bind]
        rec["n_bind"] = max(used) + 1
        rec["bind"]["arena"] = ARENA_NONE
        for role, (arena, off) in bind.items():
            if off >= 2**32:
                raise ConfigError(f"binding offset {off} of {kind} exceeds 32 bits")
            rec["bind"][slots.index(role)] = (arena, off)
        while len(consts) % ARGS_ALIGN:
            consts.append(0)
        rec["args_offset"] = len(consts)
        consts += args.tobytes()
        argd = {f: (args[f].item() if args[f].ndim == 0 else None) for f in args.dtype.names if f != "pad"}
        grid, group = _launch(kind, argd, rows)
        rec["grid"], rec["group"] = grid, group
        notes.append((kind, kern.layer, argd, slots[:rec["n_bind"]]))
        accesses.append(acc)
    for rec, flag in zip(recs, needs_barrier(accesses)):
        rec["flags"] = BARRIER if flag else 0
    return recs, notes, size, accesses
