"""The rule condition language: tokenizer, recursive-descent parser, static checks and evaluator.

Small on purpose and never `eval`: numbers, strings, true/false, names (`temp_c`,
`inference.last_score`), arithmetic `+ - * / %`, comparisons `< <= > >= == !=` (not chained),
`and`/`or`/`not`, parentheses and a few functions (`abs`, `min`, `max`, `round`, and over the
engine's short history `avg(name, "5m")`, `min_over(name, "1m")`, `max_over(name, "1m")`).
Everything is checked when the rule is loaded: a bad expression is an ExprError naming the column.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from edgeagent.core.errors import ExprError, ExprEvalError
from edgeagent.core.units import parse_duration_s

MAX_LENGTH = 1000  # characters; rules are one-liners
MAX_DEPTH = 32  # nesting of parentheses / not / unary minus / calls
MAX_TOKENS = 256  # bounds the height of operator chains too (the checks and evaluator recurse)
HISTORY_MAX_S = 3600.0  # the engine keeps at most an hour of history for avg/min_over/max_over

Value = float | bool | str

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|==|!=|[<>+\-*/%(),])
  | (?P<str>["'])
""", re.VERBOSE)
_KEYWORDS = ("and", "or", "not", "true", "false")
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # num | str | name | op | kw | end
    text: str
    col: int  # 1-based
    value: Value = ""


def tokenize(text: str) -> list[Token]:
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression longer than {MAX_LENGTH} characters", MAX_LENGTH + 1, text)
    out: list[Token] = []
    i = 0
    while i < len(text):
        m = _TOKEN_RE.match(text, i)
        if m is None:
            raise ExprError(f"unexpected character {text[i]!r}", i + 1, text)
        kind = m.lastgroup or ""
        if kind == "ws":
            i = m.end()
        elif kind == "str":
            value, i = _string(text, i)
            out.append(Token("str", text[m.start():i], m.start() + 1, value))
        elif kind == "num":
            out.append(Token("num", m.group(), i + 1, float(m.group())))
            i = m.end()
        elif kind == "name" and "__" in m.group():
            raise ExprError(f"name {m.group()!r}: names cannot contain '__'", i + 1, text)
        elif kind == "name" and m.group() in _KEYWORDS:
            out.append(Token("kw", m.group(), i + 1))
            i = m.end()
        else:
            out.append(Token(kind, m.group(), i + 1))
            i = m.end()
        if len(out) > MAX_TOKENS:
            raise ExprError(f"expression has more than {MAX_TOKENS} tokens", out[-1].col, text)
    out.append(Token("end", "", len(text) + 1))
    return out


def _string(text: str, start: int) -> tuple[str, int]:
    quote = text[start]
    i = start + 1
    chars: list[str] = []
    while i < len(text):
        c = text[i]
        if c == quote:
            return "".join(chars), i + 1
        if c == "\\":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt not in _ESCAPES:
                raise ExprError(f"unknown escape '\\{nxt}' in string", i + 1, text)
            chars.append(_ESCAPES[nxt])
            i += 2
            continue
        chars.append(c)
        i += 1
    raise ExprError("unterminated string", start + 1, text)


# --------------------------------------------------------------------------- AST


@dataclass(frozen=True, slots=True)
class Lit:
    value: Value
    col: int


@dataclass(frozen=True, slots=True)
class Name:
    name: str
    col: int


@dataclass(frozen=True, slots=True)
class Unary:
    op: str  # "-" | "not"
    operand: Node
    col: int


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # arithmetic, comparison, "and", "or"
    left: Node
    right: Node
    col: int


@dataclass(frozen=True, slots=True)
class Call:
    func: str
    args: tuple[Node, ...]
    col: int
    window_s: float = 0.0  # history functions: the parsed duration


Node = Lit | Name | Unary | Binary | Call

_ARITH = ("+", "-", "*", "/", "%")
_CMP = ("<", "<=", ">", ">=", "==", "!=")
_PLAIN_FUNCS: dict[str, tuple[int, int]] = {"abs": (1, 1), "min": (2, 16), "max": (2, 16), "round": (1, 2)}
HISTORY_FUNCS = ("avg", "min_over", "max_over")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> Token:
        return self.tokens[self.i]

    def next(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def fail(self, tok: Token, reason: str | None = None) -> ExprError:
        if reason is None:
            reason = "unexpected end of expression" if tok.kind == "end" else f"unexpected token {tok.text!r}"
        return ExprError(reason, tok.col, self.text)

    def expect(self, text: str) -> Token:
        tok = self.next()
        if tok.text != text or tok.kind not in ("op", "kw"):
            raise self.fail(tok, None if tok.kind == "end" else f"expected {text!r}, got {tok.text!r}")
        return tok

    def enter(self, tok: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(tok, f"expression nested too deeply (more than {MAX_DEPTH} levels)")

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise self.fail(self.peek(), "empty expression")
        node = self.or_()
        tok = self.peek()
        if tok.kind != "end":
            raise self.fail(tok)
        return node

    def or_(self) -> Node:
        node = self.and_()
        while self.peek().text == "or" and self.peek().kind == "kw":
            tok = self.next()
            node = Binary("or", node, self.and_(), tok.col)
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.peek().text == "and" and self.peek().kind == "kw":
            tok = self.next()
            node = Binary("and", node, self.not_(), tok.col)
        return node

    def not_(self) -> Node:
        tok = self.peek()
        if tok.kind == "kw" and tok.text == "not":
            self.next()
            self.enter(tok)
            node = Unary("not", self.not_(), tok.col)
            self.depth -= 1
            return node
        return self.cmp()

    def cmp(self) -> Node:
        node = self.sum()
        tok = self.peek()
        if tok.kind == "op" and tok.text in _CMP:
            self.next()
            node = Binary(tok.text, node, self.sum(), tok.col)
            nxt = self.peek()
            if nxt.kind == "op" and nxt.text in _CMP:
                raise self.fail(nxt, f"chained comparison {nxt.text!r}: combine comparisons with 'and'")
        return node

    def sum(self) -> Node:
        node = self.prod()
        while self.peek().kind == "op" and self.peek().text in ("+", "-"):
            tok = self.next()
            node = Binary(tok.text, node, self.prod(), tok.col)
        return node

    def prod(self) -> Node:
        node = self.unary()
        while self.peek().kind == "op" and self.peek().text in ("*", "/", "%"):
            tok = self.next()
            node = Binary(tok.text, node, self.unary(), tok.col)
        return node

    def unary(self) -> Node:
        tok = self.peek()
        if tok.kind == "op" and tok.text == "-":
            self.next()
            self.enter(tok)
            node = Unary("-", self.unary(), tok.col)
            self.depth -= 1
            return node
        return self.atom()

    def atom(self) -> Node:
        tok = self.next()
        if tok.kind in ("num", "str"):
            return Lit(tok.value, tok.col)
        if tok.kind == "kw" and tok.text in ("true", "false"):
            return Lit(tok.text == "true", tok.col)
        if tok.kind == "op" and tok.text == "(":
            self.enter(tok)
            node = self.or_()
            self.expect(")")
            self.depth -= 1
            return node
        if tok.kind == "name":
            if self.peek().kind == "op" and self.peek().text == "(":
                return self.call(tok)
            return Name(tok.text, tok.col)
        raise self.fail(tok)

    def call(self, name: Token) -> Node:
        self.enter(self.next())
        args: list[Node] = []
        if not (self.peek().kind == "op" and self.peek().text == ")"):
            args.append(self.or_())
            while self.peek().kind == "op" and self.peek().text == ",":
                self.next()
                args.append(self.or_())
        self.expect(")")
        self.depth -= 1
        func = name.text
        if func in HISTORY_FUNCS:
            return self._history_call(name, args)
        if func not in _PLAIN_FUNCS:
            known = ", ".join([*_PLAIN_FUNCS, *HISTORY_FUNCS])
            raise self.fail(name, f"unknown function {func!r} (known: {known})")
        lo, hi = _PLAIN_FUNCS[func]
        if not lo <= len(args) <= hi:
            want = str(lo) if lo == hi else f"{lo}-{hi}"
            raise self.fail(name, f"{func}() takes {want} arguments, got {len(args)}")
        return Call(func, tuple(args), name.col)

    def _history_call(self, name: Token, args: list[Node]) -> Node:
        usage = f'{name.text}(name, "5m")'
        if len(args) != 2 or not isinstance(args[0], Name) or not isinstance(args[1], Lit) \
                or not isinstance(args[1].value, str):
            raise self.fail(name, f"expected {usage}: a metric name and a duration string")
        try:
            window_s = parse_duration_s(args[1].value)
        except ValueError as exc:
            raise self.fail(name, f"{name.text}(): {exc}") from None
        if not 0 < window_s <= HISTORY_MAX_S:
            raise self.fail(name, f"{name.text}(): window must be above 0 and at most "
                                  f"{HISTORY_MAX_S:g}s, got {window_s:g}s")
        return Call(name.text, tuple(args), name.col, window_s)


# --------------------------------------------------------------------------- static types


def _kind(node: Node, text: str) -> str:
    """"bool" | "num" | "str" | "any" (names: only known when evaluated); ExprError on a misuse."""
    if isinstance(node, Lit):
        return "bool" if isinstance(node.value, bool) else "str" if isinstance(node.value, str) else "num"
    if isinstance(node, Name):
        return "any"
    if isinstance(node, Call):
        for arg in node.args if node.func not in HISTORY_FUNCS else ():
            _want(arg, "num", text, f"{node.func}() argument")
        return "num"
    if isinstance(node, Unary):
        if node.op == "not":
            _want(node.operand, "bool", text, "'not' operand")
            return "bool"
        _want(node.operand, "num", text, "'-' operand")
        return "num"
    if node.op in ("and", "or"):
        _want(node.left, "bool", text, f"'{node.op}' operand")
        _want(node.right, "bool", text, f"'{node.op}' operand")
        return "bool"
    if node.op in _ARITH:
        _want(node.left, "num", text, f"'{node.op}' operand")
        _want(node.right, "num", text, f"'{node.op}' operand")
        return "num"
    left, right = _kind(node.left, text), _kind(node.right, text)
    if node.op not in ("==", "!=") and "bool" in (left, right):
        raise ExprError(f"cannot order booleans with {node.op!r}", node.col, text)
    if "any" not in (left, right) and left != right:
        raise ExprError(f"comparing a {_NOUN[left]} with a {_NOUN[right]} using {node.op!r} is always "
                        f"{'true' if node.op == '!=' else 'false'}", node.col, text)
    return "bool"


def _want(node: Node, want: str, text: str, what: str) -> None:
    got = _kind(node, text)
    if got not in (want, "any"):
        raise ExprError(f"{what}: expected a {_NOUN[want]}, got a {_NOUN[got]}", _col(node), text)


_NOUN = {"bool": "condition", "num": "number", "str": "string", "any": "value"}


def _col(node: Node) -> int:
    return node.col


# --------------------------------------------------------------------------- compiled expression


@dataclass(frozen=True, slots=True)
class Expr:
    text: str
    root: Node
    names: frozenset[str]  # every name the values snapshot should show
    history: tuple[tuple[str, float], ...]  # (name, window_s) the engine must keep

    def evaluate(self, env: Env) -> Value:
        return _eval(self.root, env)

    def test(self, env: Env) -> bool:
        """Evaluate as a condition; ExprEvalError when a value is absent or of the wrong type."""
        value = _eval(self.root, env)
        if not isinstance(value, bool):
            raise ExprEvalError(f"condition evaluated to {type(value).__name__} {value!r}, not true/false")
        return value


def parse(text: str, *, condition: bool = True) -> Expr:
    """Parse and check once (at load); `condition`: the result must be true/false."""
    if not isinstance(text, str):
        raise ExprError("expected a string", 1, "")
    root = _Parser(text).parse()
    kind = _kind(root, text)
    if condition and kind not in ("bool", "any"):
        raise ExprError(f"expected a condition (a comparison, and/or/not, or a true/false name), "
                        f"got a {_NOUN[kind]}", _col(root), text)
    names: set[str] = set()
    history: list[tuple[str, float]] = []
    for node in _walk(root):
        if isinstance(node, Name):
            names.add(node.name)
        elif isinstance(node, Call) and node.func in HISTORY_FUNCS:
            arg = node.args[0]
            assert isinstance(arg, Name)
            history.append((arg.name, node.window_s))
    return Expr(text, root, frozenset(names), tuple(history))


def _walk(node: Node) -> Iterator[Node]:
    stack: list[Node] = [node]
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, Unary):
            stack.append(n.operand)
        elif isinstance(n, Binary):
            stack += [n.left, n.right]
        elif isinstance(n, Call):
            stack += list(n.args)


# --------------------------------------------------------------------------- evaluation


class Env(Protocol):
    def lookup(self, name: str) -> Value:
        """The current value of `name`; ExprEvalError(name=...) when it is absent."""

    def history(self, func: str, name: str, window_s: float) -> float:
        """avg/min_over/max_over of `name` over the last `window_s`; ExprEvalError when empty."""


def _num(value: Value, node: Node) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExprEvalError(f"expected a number at column {node.col}, got {value!r}")
    return float(value)


def _bool(value: Value, node: Node) -> bool:
    if not isinstance(value, bool):
        raise ExprEvalError(f"expected true/false at column {node.col}, got {value!r}")
    return value


_ARITH_FN: dict[str, Callable[[float, float], float]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: a / b, "%": lambda a, b: math.fmod(a, b),
}


def _eval(node: Node, env: Env) -> Value:
    if isinstance(node, Lit):
        return node.value
    if isinstance(node, Name):
        return env.lookup(node.name)
    if isinstance(node, Unary):
        if node.op == "not":
            return not _bool(_eval(node.operand, env), node.operand)
        return -_num(_eval(node.operand, env), node.operand)
    if isinstance(node, Call):
        return _call(node, env)
    op = node.op
    if op == "and":
        return _bool(_eval(node.left, env), node.left) and _bool(_eval(node.right, env), node.right)
    if op == "or":
        return _bool(_eval(node.left, env), node.left) or _bool(_eval(node.right, env), node.right)
    left, right = _eval(node.left, env), _eval(node.right, env)
    if op in _ARITH:
        a, b = _num(left, node.left), _num(right, node.right)
        if op in ("/", "%") and b == 0:
            raise ExprEvalError(f"division by zero at column {node.col}")
        return _ARITH_FN[op](a, b)
    if op in ("==", "!="):
        same = type(left) is type(right) or (
            not isinstance(left, (bool, str)) and not isinstance(right, (bool, str)))
        equal = same and left == right
        return equal if op == "==" else not equal
    if isinstance(left, str) and isinstance(right, str):
        a_s, b_s = left, right
        return {"<": a_s < b_s, "<=": a_s <= b_s, ">": a_s > b_s, ">=": a_s >= b_s}[op]
    a, b = _num(left, node.left), _num(right, node.right)
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def _call(node: Call, env: Env) -> float:
    if node.func in HISTORY_FUNCS:
        arg = node.args[0]
        assert isinstance(arg, Name)
        return env.history(node.func, arg.name, node.window_s)
    args = [_num(_eval(a, env), a) for a in node.args]
    if node.func == "abs":
        return abs(args[0])
    if node.func == "min":
        return min(args)
    if node.func == "max":
        return max(args)
    digits = int(args[1]) if len(args) > 1 else 0
    if not (math.isfinite(args[0]) and -12 <= digits <= 12):
        raise ExprEvalError(f"round() arguments out of range at column {node.col}")
    return float(round(args[0], digits))


def check_expression(text: str) -> str | None:
    """For config validation: None, or the error with its column."""
    try:
        parse(text)
    except ExprError as exc:
        return str(exc)
    return None
