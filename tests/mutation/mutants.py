"""The mutants of one module: AST operator swaps on its Python, token and hand-made mutants on
the Lua scripts it embeds.

A mutant is a splice of the module's source (a byte range and its replacement), so everything
but the mutated node stays as written and line numbers stay true. Each has a key that names it
by where and what (`function: before -> after`), not by a line number, so the list of
equivalent mutants survives edits elsewhere in the file.

What is not mutated, and why: docstrings, annotations, decorators and imports (declarations,
not behaviour); log calls (their text is for people; the suite checks behaviour); the text of
error messages (in `raise`, in f-strings, and in the calls the config names as message calls:
message-only mutants say nothing about the payment core). The Lua scripts are not mutated as
Python strings (one mutant that breaks the whole script): they get their own mutants.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@dataclass(frozen=True, slots=True)
class ModuleConfig:
    name: str
    path: Path
    module: str
    tests: tuple[str, ...]
    args: tuple[str, ...] = ()
    lua: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LuaMutant:
    module: str
    script: str
    find: str
    replace: str
    why: str


@dataclass(frozen=True, slots=True)
class Equivalent:
    module: str
    mutant: str
    why: str


@dataclass(frozen=True, slots=True)
class Config:
    modules: tuple[ModuleConfig, ...]
    message_calls: frozenset[str]
    log_names: frozenset[str]
    lua_mutants: tuple[LuaMutant, ...]
    equivalents: tuple[Equivalent, ...]


@dataclass(frozen=True, slots=True)
class Mutant:
    module: str
    key: str  # unique within the module, stable across edits elsewhere in the file
    line: int
    start: int  # byte offsets into the module's source
    end: int
    replacement: bytes
    kind: str = "python"  # or "lua"
    lines: tuple[int, int] = (0, 0)  # first and last line a test must run to reach it

    def apply(self, source: bytes) -> bytes:
        return source[: self.start] + self.replacement + source[self.end :]


def load_config(directory: Path = HERE) -> Config:
    with (directory / "modules.toml").open("rb") as f:
        raw = tomllib.load(f)
    modules = tuple(
        ModuleConfig(
            name=name,
            path=ROOT / row["path"],
            module=row["module"],
            tests=tuple(row["tests"]),
            args=tuple(row.get("args", ())),
            lua=tuple(row.get("lua", ())),
        )
        for name, row in raw["modules"].items()
    )
    with (directory / "lua.toml").open("rb") as f:
        lua_raw = tomllib.load(f)
    with (directory / "equivalent.toml").open("rb") as f:
        eq_raw = tomllib.load(f)
    return Config(
        modules=modules,
        message_calls=frozenset(raw["skip"]["message_calls"]),
        log_names=frozenset(raw["skip"]["log_names"]),
        lua_mutants=tuple(LuaMutant(**m) for m in lua_raw.get("mutant", [])),
        equivalents=tuple(Equivalent(**e) for e in eq_raw.get("equivalent", [])),
    )


# --- Python -----------------------------------------------------------------------------------

_COMPARE_SWAPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_BINOP_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
    ast.BitXor: ast.BitOr,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
}


@dataclass
class _Edit:
    node: ast.AST
    text: str  # replacement source
    label: str  # what it becomes, for the key
    lines: tuple[int, int]  # the lines a test runs when it runs the mutated code


@dataclass
class _Walker:
    source: bytes
    message_calls: frozenset[str]
    log_names: frozenset[str]
    lua_names: frozenset[str]
    edits: list[tuple[str, _Edit]] = field(default_factory=list)
    lua_nodes: dict[str, ast.Constant] = field(default_factory=dict)
    stmt: ast.stmt | None = None  # the innermost statement being walked

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.source.decode(), node) or ast.unparse(node)

    def add(self, qual: str, node: ast.AST, new: ast.AST | str) -> None:
        text = new if isinstance(new, str) else f"({ast.unparse(new)})"
        label = new if isinstance(new, str) else ast.unparse(new)
        end: int = node.end_lineno  # type: ignore[attr-defined]
        start: int = node.lineno  # type: ignore[attr-defined]
        stmt = self.stmt
        if stmt is not None:
            # From the statement's first line (where a line event is sure to come) to the
            # mutated node's end (a compound statement's body is not part of its test).
            start = min(start, stmt.lineno)
            if not hasattr(stmt, "body"):
                end = max(end, stmt.end_lineno or end)
        self.edits.append((qual, _Edit(node, text, label, (start, end))))

    # The walk ---------------------------------------------------------------------------------

    def body(self, stmts: list[ast.stmt], qual: str) -> None:
        for i, stmt in enumerate(stmts):
            if i == 0 and _is_docstring(stmt):
                continue
            self.visit(stmt, qual, in_message=False)

    def visit(self, node: ast.AST, qual: str, *, in_message: bool) -> None:
        if isinstance(node, ast.stmt):
            outer, self.stmt = self.stmt, node
            try:
                self._visit(node, qual, in_message=in_message)
            finally:
                self.stmt = outer
        else:
            self._visit(node, qual, in_message=in_message)

    def _visit(self, node: ast.AST, qual: str, *, in_message: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            inner = f"{qual}.{node.name}" if qual else node.name
            if not isinstance(node, ast.ClassDef):
                for default in [*node.args.defaults, *node.args.kw_defaults]:
                    if default is not None:
                        self.visit(default, inner, in_message=False)
            self.body(node.body, inner)
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            return
        if isinstance(node, ast.JoinedStr):
            return  # message text
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            return  # a string used as a comment
        if isinstance(node, ast.Call) and self._is_log_call(node):
            return
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and self._is_log_call(node.value)
        ):
            return
        if isinstance(node, ast.Assign):
            names = {t.id for t in node.targets if isinstance(t, ast.Name)}
            if names & self.lua_names and isinstance(node.value, ast.Constant):
                self.lua_nodes[next(iter(names & self.lua_names))] = node.value
                return
            if names & (self.log_names | {"__all__"}):
                return
        if isinstance(node, ast.AnnAssign):
            if node.value is not None:
                self._mutate(node, qual, in_message)
                self.visit(node.value, qual, in_message=in_message)
            return
        if isinstance(node, ast.Raise):
            in_message = True
        if isinstance(node, ast.Call) and _call_name(node) in self.message_calls:
            # Only the call's string arguments are message text; the rest still counts.
            self._mutate(node, qual, in_message)
            self.visit(node.func, qual, in_message=in_message)
            for arg in node.args:
                self.visit(arg, qual, in_message=True)
            for kw in node.keywords:
                self.visit(kw.value, qual, in_message=in_message)
            return
        self._mutate(node, qual, in_message)
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "decorator_list", "type_comment"):
                continue
            if isinstance(value, list):
                for item in value:
                    if isinstance(item, ast.stmt):
                        self.visit(item, qual, in_message=False)
                    elif isinstance(item, ast.AST):
                        self.visit(item, qual, in_message=in_message)
            elif isinstance(value, ast.AST):
                self.visit(value, qual, in_message=in_message)

    def _is_log_call(self, node: ast.Call) -> bool:
        func = node.func
        while isinstance(func, ast.Attribute):
            func = func.value
        return isinstance(func, ast.Name) and func.id in self.log_names

    # The operators ----------------------------------------------------------------------------

    def _mutate(self, node: ast.AST, qual: str, in_message: bool) -> None:
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                swap = _COMPARE_SWAPS.get(type(op))
                if swap is not None:
                    ops = list(node.ops)
                    ops[i] = swap()
                    self.add(qual, node, ast.Compare(node.left, ops, node.comparators))
        elif isinstance(node, ast.BinOp):
            bin_swap = _BINOP_SWAPS.get(type(node.op))
            if bin_swap is not None:
                self.add(qual, node, ast.BinOp(node.left, bin_swap(), node.right))
        elif isinstance(node, ast.BoolOp):
            other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            self.add(qual, node, ast.BoolOp(other, node.values))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
            self.add(qual, node, f"({self.segment(node.operand)})")
        elif isinstance(node, ast.Constant):
            self._constant(node, qual, in_message)
        elif isinstance(node, ast.AugAssign):
            aug_swap = _BINOP_SWAPS.get(type(node.op))
            if aug_swap is not None:
                self.add(
                    qual, node, ast.unparse(ast.AugAssign(node.target, aug_swap(), node.value))
                )
        elif isinstance(node, ast.Expr):
            self.add(qual, node, "pass")
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            if node.value is not None and not _is_none(node.value):
                self.add(qual, node.value, "None")
        elif isinstance(node, ast.Return):
            if node.value is not None and not isinstance(node.value, ast.Constant):
                self.add(qual, node.value, "None")
        elif isinstance(node, ast.Break):
            self.add(qual, node, "continue")
        elif isinstance(node, ast.Continue):
            self.add(qual, node, "break")

    def _constant(self, node: ast.Constant, qual: str, in_message: bool) -> None:
        value = node.value
        if isinstance(value, bool):
            self.add(qual, node, repr(not value))
        elif isinstance(value, int | float):
            self.add(qual, node, repr(value + 1))
        elif isinstance(value, str) and not in_message:
            self.add(qual, node, repr(f"XX{value}XX"))
        elif isinstance(value, bytes) and not in_message:
            self.add(qual, node, repr(b"XX" + value + b"XX"))


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


class _Offsets:
    """Byte offsets of (line, byte column) positions, as the AST reports them."""

    def __init__(self, source: bytes) -> None:
        self.starts = [0]
        for line in source.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))

    def __call__(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unique(keys: dict[str, int], key: str) -> str:
    n = keys.get(key, 0) + 1
    keys[key] = n
    return key if n == 1 else f"{key} #{n}"


def python_mutants(
    cfg: ModuleConfig, source: bytes, config: Config
) -> tuple[list[Mutant], dict[str, ast.Constant]]:
    tree = ast.parse(source)
    walker = _Walker(source, config.message_calls, config.log_names, frozenset(cfg.lua))
    walker.body(tree.body, "")
    offsets = _Offsets(source)
    seen: dict[str, int] = {}
    produced: set[bytes] = set()
    out: list[Mutant] = []
    for qual, edit in walker.edits:
        node = edit.node
        start = offsets(node.lineno, node.col_offset)  # type: ignore[attr-defined]
        end = offsets(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        replacement = edit.text.encode()
        mutated = source[:start] + replacement + source[end:]
        if mutated in produced or mutated == source:
            continue
        produced.add(mutated)
        before = source[start:end].decode()
        key = _unique(seen, f"{qual or '<module>'}: {_short(before)} -> {_short(edit.label)}")
        line: int = node.lineno  # type: ignore[attr-defined]
        out.append(Mutant(cfg.name, key, line, start, end, replacement, lines=edit.lines))
    return out, walker.lua_nodes


# --- Lua --------------------------------------------------------------------------------------

# Strings are matched so that nothing inside them is mutated (hand-made mutants do that).
_LUA_TOKEN = re.compile(r"'[^']*'|\"[^\"]*\"|>=|<=|==|~=|>|<|\b(?:and|or|not)\b|\b\d+\b")
_LUA_OPS = {">=": ">", "<=": "<", ">": ">=", "<": "<=", "==": "~=", "~=": "==", "and": "or"}
_LUA_OPS["or"] = "and"


def lua_text_mutants(text: str) -> Iterator[tuple[str, str]]:
    """(label, mutated script) for each token mutant of one Lua script: comparison and logical
    operators swapped, `not` dropped, integer literals + 1, each `redis.call` statement dropped."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("redis.call("):
            yield (
                f"{stripped} -> (deleted)",
                "\n".join([*lines[:i], "", *lines[i + 1 :]]),
            )
        for match in _LUA_TOKEN.finditer(line):
            token = match.group(0)
            if token[0] in "'\"":
                continue
            if token == "not":
                new = line[: match.start()] + line[match.end() :].lstrip()
            elif token.isdigit():
                new = line[: match.start()] + str(int(token) + 1) + line[match.end() :]
            else:
                new = line[: match.start()] + _LUA_OPS[token] + line[match.end() :]
            yield f"{stripped} -> {new.strip()}", "\n".join([*lines[:i], new, *lines[i + 1 :]])


def _lua_literal(text: str) -> str:
    if '"""' in text or "\\" in text:
        return repr(text)
    return f'"""{text}"""'


def lua_mutants(
    cfg: ModuleConfig, source: bytes, nodes: dict[str, ast.Constant], config: Config
) -> list[Mutant]:
    missing = set(cfg.lua) - set(nodes)
    if missing:
        raise ValueError(f"{cfg.name}: no Lua script named {sorted(missing)} in {cfg.path}")
    offsets = _Offsets(source)
    seen: dict[str, int] = {}
    out: list[Mutant] = []
    for script, node in nodes.items():
        text = node.value
        assert isinstance(text, str)
        start = offsets(node.lineno, node.col_offset)
        end = offsets(node.end_lineno, node.end_col_offset)  # type: ignore[arg-type]
        produced: set[str] = set()
        candidates = list(lua_text_mutants(text))
        for hand in config.lua_mutants:
            if hand.module != cfg.name or hand.script != script:
                continue
            if text.count(hand.find) != 1:
                raise ValueError(
                    f"{cfg.name}: hand-made Lua mutant {hand.find!r} must occur exactly once in "
                    f"{script} (found {text.count(hand.find)}); update tests/mutation/lua.toml"
                )
            label = f"{_short(hand.find)} -> {_short(hand.replace) or '(deleted)'}"
            candidates.append((f"hand: {label}", text.replace(hand.find, hand.replace)))
        for label, mutated in candidates:
            if mutated in produced or mutated == text:
                continue
            produced.add(mutated)
            key = _unique(seen, f"{script}: {label}")
            replacement = _lua_literal(mutated).encode()
            # A script runs where it is called, not where it is defined: every test may.
            out.append(Mutant(cfg.name, key, node.lineno, start, end, replacement, kind="lua"))
    return out


def module_mutants(cfg: ModuleConfig, config: Config) -> tuple[bytes, list[Mutant]]:
    source = cfg.path.read_bytes()
    python, nodes = python_mutants(cfg, source, config)
    return source, python + lua_mutants(cfg, source, nodes, config)
