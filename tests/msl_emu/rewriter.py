"""Rewrite a .metal source into C++ that include/msl_shim.h compiles.

Macros in the shim handle most of MSL; this rewrites only what macros cannot:
  * `threadgroup T*` / `threadgroup T&`   -> checked proxies msl_rt::tg_ptr<T> / tg_ref<T>
  * `threadgroup T name[N]...;`           -> per-threadgroup region (poisoned, bounds- and race-checked)
  * half literals `1.0h`                  -> half(1.0)
  * `[[host_name("x")]]` instantiations   -> plain explicit instantiations (the name goes to the launcher)
  * each kernel                           -> an extern "C" launcher mapping [[buffer(i)]],
                                             [[threadgroup(i)]] and builtins to its parameters.
Comments are blanked first; line numbers are kept so compiler errors point into the .metal file.
"""
import re
from dataclasses import dataclass, field

# MSL attribute -> field of msl_rt::ThreadCtx, and whether it is a 3-vector
BUILTINS = {
    "thread_position_in_grid": ("tpig", True),
    "thread_position_in_threadgroup": ("tpitg", True),
    "threadgroup_position_in_grid": ("tgpig", True),
    "threads_per_threadgroup": ("tptg", True),
    "threadgroups_per_grid": ("tgpg", True),
    "threads_per_grid": ("tpg", True),
    "thread_index_in_threadgroup": ("tiitg", False),
    "thread_index_in_simdgroup": ("lane", False),
    "simdgroup_index_in_threadgroup": ("sgitg", False),
    "threads_per_simdgroup": ("tpsg", False),
    "thread_execution_width": ("tpsg", False),
    "simdgroups_per_threadgroup": ("sgptg", False),
}
MAX_BUFFER_BINDINGS = 31  # Metal's maxKernelBufferBindCount


class RewriteError(ValueError):
    """The source uses MSL outside the emulator's subset, or a kernel signature it cannot bind."""


@dataclass
class Param:
    name: str
    type: str
    attr: str          # "buffer", "threadgroup" or a builtin name
    index: int | None  # for buffer / threadgroup


@dataclass
class Kernel:
    name: str          # host name (what dispatch() takes)
    call: str          # C++ expression naming the function (with template arguments)
    params: list = field(default_factory=list)
    max_threads: int | None = None   # [[max_total_threads_per_threadgroup(N)]]

    def buffer_params(self):
        return [p for p in self.params if p.attr == "buffer"]

    def threadgroup_params(self):
        return [p for p in self.params if p.attr == "threadgroup"]


def blank_comments(src):
    """Replace comments by spaces (newlines kept); string and char literals are left alone."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i)); i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j])); i = j
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            out.append(src[i:j + 1]); i = j + 1
        else:
            out.append(c); i += 1
    return "".join(out)


def line_of(src, pos):
    return src.count("\n", 0, pos) + 1


def matching(src, i, open_ch="(", close_ch=")"):
    depth = 0
    for j in range(i, len(src)):
        if src[j] == open_ch:
            depth += 1
        elif src[j] == close_ch:
            depth -= 1
            if depth == 0:
                return j
    raise RewriteError(f"line {line_of(src, i)}: unbalanced '{open_ch}'")


def split_top(s):
    """Split a parameter list at top-level commas."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i]); start = i + 1
    if s[start:].strip():
        parts.append(s[start:])
    return parts


def parse_param(text, kernel, line):
    m = re.search(r"\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]", text)
    decl = " ".join(re.sub(r"\[\[.*?\]\]", " ", text).split())
    nm = re.search(r"(\w+)\s*$", decl)
    if not m or not nm:
        raise RewriteError(f"line {line}: kernel {kernel}: parameter `{decl}` has no [[buffer(i)]], "
                           f"[[threadgroup(i)]] or builtin attribute")
    attr, index = m.group(1), (int(m.group(2)) if m.group(2) else None)
    if attr not in ("buffer", "threadgroup") and attr not in BUILTINS:
        raise RewriteError(f"line {line}: kernel {kernel}: unsupported parameter attribute [[{attr}]]")
    if attr in ("buffer", "threadgroup") and index is None:
        raise RewriteError(f"line {line}: kernel {kernel}: [[{attr}]] needs an index")
    if attr == "buffer" and index >= MAX_BUFFER_BINDINGS:
        raise RewriteError(f"line {line}: kernel {kernel}: buffer index {index} >= {MAX_BUFFER_BINDINGS}")
    return Param(name=nm.group(1), type=decl[:nm.start()].strip(), attr=attr, index=index)


HALF_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?[hH]\b")
TG_POINTER = re.compile(r"\bthreadgroup\s+([\w:<>\s]+?)\s*([*&])")
TG_DECL = re.compile(r"^([ \t]*)threadgroup\s+([\w:<>, ]+?)\s+(\w+)\s*((?:\[[^\]\n]*\])*)\s*;", re.M)
KERNEL = re.compile(r"(?:\bkernel\b|\[\[\s*kernel\s*\]\])\s+void\s+(\w+)\s*\(")
INSTANCE = re.compile(r"template\s*\[\[\s*host_name\(\s*\"(\w+)\"\s*\)\s*\]\]\s*(?:\[\[\s*kernel\s*\]\]|kernel)?"
                      r"([^;]*?)\b(\w+)\s*(<[^;()]*>)\s*;")
MAX_THREADS = re.compile(r"\[\[\s*max_total_threads_per_threadgroup\s*\(\s*(\d+)\s*\)\s*\]\]")


def tg_decl(m):
    indent, typ, name, dims = m.group(1), m.group(2).strip(), m.group(3), m.group(4)
    full = f"{typ}{''.join(dims.split())}"
    return (f"{indent}static thread_local ::msl_rt::StaticRegion<{full}> {name}__region(\"{name}\"); "
            f"const auto {name} = ::msl_rt::tg_view<{full}>({name}__region.enter());")


def convert(src, filename):
    """Return (C++ source, [Kernel]) for the MSL source `src` read from `filename`."""
    src = blank_comments(src)
    src = HALF_LITERAL.sub(lambda m: f"half({m.group(1)}{m.group(2) or ''})", src)

    instances = []  # (host_name, function, template arguments)

    def instance(m):
        instances.append((m.group(1), m.group(3), m.group(4)))
        return f"template decltype({m.group(3)}{m.group(4)}) {m.group(3)}{m.group(4)};"
    src = INSTANCE.sub(instance, src)

    kernels, pieces, pos = [], [], 0
    for m in KERNEL.finditer(src):
        name, line = m.group(1), line_of(src, m.start())
        close = matching(src, m.end() - 1)
        params = [parse_param(p, name, line) for p in split_top(src[m.end():close])]
        # what precedes the signature up to the previous declaration: template header, attributes
        head_start = max(src.rfind(";", 0, m.start()), src.rfind("}", 0, m.start())) + 1
        head = src[head_start:m.start()]
        mt = MAX_THREADS.search(head)
        max_threads = int(mt.group(1)) if mt else None
        if re.search(r"\btemplate\s*<", head):
            insts = [i for i in instances if i[1] == name]
            if not insts:
                raise RewriteError(f"line {line}: template kernel {name} has no "
                                   f"`template [[host_name(\"...\")]] kernel ... {name}<...>;` instantiation")
            kernels += [Kernel(host, fn + targs, params, max_threads) for host, fn, targs in insts]
        else:
            kernels.append(Kernel(name, name, params, max_threads))
        pieces += [src[pos:m.end()], re.sub(r"\[\[.*?\]\]", "", src[m.end():close])]
        pos = close
    src = "".join(pieces) + src[pos:]
    names = [k.name for k in kernels]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RewriteError(f"kernel names defined twice: {sorted(dup)}")

    src = TG_POINTER.sub(lambda m: f"::msl_rt::{'tg_ptr' if m.group(2) == '*' else 'tg_ref'}<{' '.join(m.group(1).split())}> ", src)
    src = TG_DECL.sub(tg_decl, src)
    left = re.search(r"\bthreadgroup\b", src)
    if left:
        raise RewriteError(f"line {line_of(src, left.start())}: unsupported use of `threadgroup` (supported: "
                           f"`threadgroup T* p`, `threadgroup T& r`, `threadgroup T name[N]...;` one per statement)")

    out = ['#include "msl_shim.h"', f'#line 1 "{filename}"', src, f'#line 1 "{filename} (generated launchers)"']
    for k in kernels:
        out.append(launcher(k))
    return "\n".join(out) + "\n", kernels


def launcher(k):
    args = []
    for p in k.params:
        if p.attr == "buffer":
            args.append(f"::msl_rt::BufferArg{{L->buffers[{p.index}], L->buffer_len[{p.index}], {p.index}}}")
        elif p.attr == "threadgroup":
            args.append(f"::msl_rt::ThreadgroupArg{{{p.index}}}")
        else:
            fld, is3 = BUILTINS[p.attr]
            args.append(f"::msl_rt::{'BuiltinU3' if is3 else 'BuiltinU32'}{{::msl_rt::cur().{fld}}}")
    tg_names = {p.index: p.name for p in k.threadgroup_params()}
    n_names = max(tg_names, default=-1) + 1
    names = ", ".join(f'"{tg_names.get(i, f"threadgroup({i})")}"' for i in range(n_names)) or "nullptr"
    return (f'extern "C" void msl_launch_{k.name}(const ::msl_rt::Launch* launch) {{\n'
            f"  static const char* const names[] = {{{names}}};\n"
            f"  ::msl_rt::dispatch(*launch, names, {n_names}, [](void* arg) {{\n"
            f"    const ::msl_rt::Launch* L = static_cast<const ::msl_rt::Launch*>(arg);\n"
            f"    (void)L;\n"
            f"    {k.call}({', '.join(args)});\n"
            f"  }}, (void*)launch);\n"
            f"}}")
