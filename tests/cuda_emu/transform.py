"""The mechanical source transforms that let the host compiler take a CUDA kernel file.

Three, each asserted: every ``kernel<<<...>>>(...)`` launch becomes a call of
``emu::launch``; every ``__shared__`` declaration becomes a guarded, per-block shared
array (``EMU_SHARED``) or the launch's dynamic shared memory; the host branch of the
``mma`` macro (``MX_MMA_SYNC``, ``__trap()`` outside device code) calls the emulated
``mma.sync``. Everything else compiles unchanged against the shim (``shim/``). A source
that no longer matches a transform is an error naming the pattern, never a silently
skipped kernel. Line numbers are kept, and ``#line`` names the original file.
"""

from __future__ import annotations

import re


class TransformError(RuntimeError):
    """A kernel source no longer matches one of the transforms."""


DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+__align__\(\d+\)\s+unsigned\s+char\s+(\w+)\s*\[\s*\]\s*;")
STATIC_SHARED = re.compile(r"__shared__\s+(?:__align__\((\d+)\)\s+)?([A-Za-z_][\w:]*)\s+(\w+)((?:\[[^\]\n]+\])+)\s*;")
MMA_HOST_BRANCH = re.compile(r"#define\s+MX_MMA_SYNC\(\s*shape_and_types\s*,\s*c\s*,\s*a\s*,\s*b\s*\)\s+__trap\(\)")
MMA_EMULATED = "#define MX_MMA_SYNC(shape_and_types, c, a, b) ::emu::mma_sync(__FILE__, __LINE__, shape_and_types, c, a, b)"


def _fail(path: str, pattern: str, detail: str) -> None:
    raise TransformError(f"{path}: the transform '{pattern}' does not match: {detail}")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _matching(text: str, pos: int, open_char: str, close_char: str, step: int) -> int:
    """Index of the bracket matching text[pos], scanning forwards (step 1) or backwards (-1)."""
    depth = 0
    while 0 <= pos < len(text):
        if text[pos] == open_char:
            depth += 1
        elif text[pos] == close_char:
            depth -= 1
            if depth == 0:
                return pos
        pos += step
    return -1


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def transform_launches(text: str, path: str) -> str:
    """kernel<<<grid, block[, bytes[, stream]]>>>(args) -> ::emu::launch(...)."""
    pattern = "kernel<<<grid, block[, bytes[, stream]]>>>(args)"
    out, pos = [], 0
    while (start := text.find("<<<", pos)) >= 0:
        line = _line_of(text, start)
        # the kernel: an identifier, with template arguments
        k = start - 1
        while k >= 0 and text[k].isspace():
            k -= 1
        if k >= 0 and text[k] == ">":
            k = _matching(text, k, ">", "<", -1) - 1
        while k >= 0 and (text[k].isalnum() or text[k] in "_:"):
            k -= 1
        name = text[k + 1:start].strip()
        if not re.fullmatch(r"[A-Za-z_][\w:]*(<.*>)?", name, re.S):
            _fail(path, pattern, f"no kernel name before <<< at line {line}")
        config_end = text.find(">>>", start)
        if config_end < 0:
            _fail(path, pattern, f"no >>> after <<< at line {line}")
        config = _split_top_level(text[start + 3:config_end])
        if not 2 <= len(config) <= 4:
            _fail(path, pattern, f"{len(config)} launch parameters at line {line}")
        paren = config_end + 3
        while paren < len(text) and text[paren].isspace():
            paren += 1
        close = _matching(text, paren, "(", ")", 1) if paren < len(text) and text[paren] == "(" else -1
        if close < 0:
            _fail(path, pattern, f"no argument list after >>> at line {line}")
        args = text[paren + 1:close].strip()
        grid, block = config[0], config[1]
        smem = config[2] if len(config) > 2 else "0"
        stream = config[3] if len(config) > 3 else "nullptr"
        call = (f'::emu::launch("{" ".join(name.split())}", __PRETTY_FUNCTION__, {name}, dim3({grid}), '
                f"dim3({block}), static_cast<size_t>({smem}), {stream}{', ' if args else ''}{args})")
        replaced = text[k + 1:close + 1]
        out.append(text[pos:k + 1])
        out.append(" ".join(call.split("\n")) + "\n" * replaced.count("\n"))
        pos = close + 1
    out.append(text[pos:])
    return "".join(out)


def transform_shared(text: str, path: str) -> str:
    """__shared__ declarations -> EMU_SHARED arrays or emu::dynamic_shared()."""
    total = len(re.findall(r"\b__shared__\b", text))
    text, dynamic = DYNAMIC_SHARED.subn(r"unsigned char* \1 = ::emu::dynamic_shared();", text)

    def static(m: re.Match) -> str:
        align, type_, name, dims = m.groups()
        if align and int(align) > 16:
            _fail(path, STATIC_SHARED.pattern, f"__align__({align}) of {name}: at most 16 is emulated")
        return f"EMU_SHARED({type_}, {name}, {dims});"

    text, static_count = STATIC_SHARED.subn(static, text)
    left = [(_line_of(text, m.start()), text[m.start():text.find("\n", m.start())])
            for m in re.finditer(r"\b__shared__\b", text)]
    if left or dynamic + static_count != total:
        _fail(path, STATIC_SHARED.pattern + " | " + DYNAMIC_SHARED.pattern,
              "unmatched __shared__ declaration(s): " + "; ".join(f"line {n}: {s.strip()}" for n, s in left))
    return text


def transform_mma(text: str, path: str) -> str:
    """The mma macro's host branch (__trap()) -> the emulated mma.sync."""
    if "mma.sync" not in text:
        return text
    text, count = MMA_HOST_BRANCH.subn(MMA_EMULATED, text)
    if count != 1:
        _fail(path, MMA_HOST_BRANCH.pattern, f"{count} host branches of the mma macro (expected 1)")
    return text


def transform(text: str, path: str) -> str:
    """The kernel file `path` (relative to the repository, for #line) for the host compiler."""
    text = transform_mma(transform_shared(transform_launches(text, path), path), path)
    return f'#line 1 "{path}"\n' + text
