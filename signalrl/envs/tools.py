"""Tools: typed Python functions a policy calls with `<tool_call>{json}</tool_call>`.

A tool is a function with type hints and a Google-style docstring; its JSON schema (the
OpenAI / Hugging Face `tools=` convention) comes from `transformers.utils.get_json_schema`,
so a chat template renders it exactly as it renders any Hugging Face tool. Calls are parsed
in the Hermes / Qwen form, strictly: every `<tool_call>...</tool_call>` block must hold one
JSON object `{"name": str, "arguments": {...}}` naming a known tool with arguments that match
its schema (required present, no unknown keys, JSON types right). Anything else is a
`ToolCallError` whose message becomes the tool observation, and is counted.

Built-in tools (`BUILTIN_TOOLS`):
- `calculator`: exact arithmetic on integers and fractions (`+ - * / ** ( )`, unary minus),
  parsed by a small recursive-descent parser (`evaluate_expression`); no `eval`;
- `python`: runs a program in the code sandbox (`signalrl.rewards.sandbox`: bubblewrap when
  usable, resource limits always) under a wall-clock timeout and returns its stdout,
  cut to `PYTHON_OUTPUT_CHARS`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
TOOL_CALL_OPEN = "<tool_call>"
PYTHON_OUTPUT_CHARS = 700
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


class ToolCallError(ValueError):
    """A call that cannot be run: its message is what the policy is told."""


@dataclass
class Tool:
    """A callable with its JSON schema and an optional wall-clock `timeout` (seconds)."""

    fn: Callable[..., Any]
    timeout: float | None = None
    schema: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.schema:
            from transformers.utils import get_json_schema

            self.schema = get_json_schema(self.fn)

    @property
    def name(self) -> str:
        return str(self.schema["function"]["name"])

    def check_arguments(self, args: Any) -> None:
        """Strict argument check against the schema (raises `ToolCallError`)."""
        params = self.schema["function"].get("parameters", {})
        props: dict[str, Any] = params.get("properties", {})
        if not isinstance(args, dict):
            raise ToolCallError(f"tool {self.name}: 'arguments' must be a JSON object")
        unknown = sorted(set(args) - set(props))
        if unknown:
            raise ToolCallError(
                f"tool {self.name}: unknown argument(s) {', '.join(unknown)}; "
                f"valid: {', '.join(props) or 'none'}"
            )
        missing = [k for k in params.get("required", []) if k not in args]
        if missing:
            raise ToolCallError(f"tool {self.name}: missing argument(s) {', '.join(missing)}")
        for key, value in args.items():
            kind = props[key].get("type")
            types = _JSON_TYPES.get(kind) if isinstance(kind, str) else None
            bad_bool = isinstance(value, bool) and kind in ("integer", "number")
            if types is not None and (not isinstance(value, types) or bad_bool):
                raise ToolCallError(
                    f"tool {self.name}: argument {key} must be a JSON {kind}, "
                    f"got {type(value).__name__}"
                )

    def __call__(self, args: dict[str, Any]) -> str:
        """The tool's result as text; raises `ToolCallError` for bad arguments or a call
        past `timeout` (the call is left running in a daemon thread), and whatever the
        function raises."""
        self.check_arguments(args)
        if self.timeout is None:
            return str(self.fn(**args))
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["out"] = self.fn(**args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box["err"] = e

        worker = threading.Thread(target=target, daemon=True, name=f"tool-{self.name}")
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise ToolCallError(f"tool {self.name} did not finish within {self.timeout:g} s")
        if "err" in box:
            raise box["err"]
        return str(box["out"])


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tool_calls(text: str, tools: dict[str, Tool]) -> list[ToolCall | ToolCallError]:
    """Every `<tool_call>` block of `text`, in order: a `ToolCall` or the `ToolCallError`
    saying why it is malformed (bad JSON, not an object, a missing or unknown name, bad
    arguments). An opening tag without its closing tag is an error too."""
    out: list[ToolCall | ToolCallError] = []
    for body in TOOL_CALL.findall(text):
        out.append(_parse_one(body, tools))
    if text.count(TOOL_CALL_OPEN) > len(out):
        out.append(ToolCallError("a <tool_call> block is not closed with </tool_call>"))
    return out


def _parse_one(body: str, tools: dict[str, Tool]) -> ToolCall | ToolCallError:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCallError(f"tool call is not valid JSON ({e.msg} at char {e.pos})")
    if not isinstance(obj, dict):
        return ToolCallError('tool call must be a JSON object {"name": ..., "arguments": ...}')
    extra = sorted(set(obj) - {"name", "arguments"})
    if extra:
        return ToolCallError(f"tool call has unknown key(s) {', '.join(extra)}")
    name = obj.get("name")
    if not isinstance(name, str):
        return ToolCallError("tool call has no 'name' string")
    if name not in tools:
        return ToolCallError(f"unknown tool {name!r}; available: {', '.join(sorted(tools))}")
    args = obj.get("arguments", {})
    try:
        tools[name].check_arguments(args)
    except ToolCallError as e:
        return e
    return ToolCall(name, args)


# --------------------------------------------------------------------------------------
# calculator: exact arithmetic without eval
# --------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|(\*\*|[-+*/()]))")
MAX_EXPONENT = 512
MAX_DIGITS = 4000


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := '-' unary | '+' unary | power; power := atom ('**' unary)?;
    atom := number | '(' expr ')'."""

    def __init__(self, text: str) -> None:
        self.tokens: list[str] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"unexpected character {text[pos:].lstrip()[:1]!r}")
            self.tokens.append(m.group(1) or m.group(2))
            pos = m.end()
            while pos < len(text) and text[pos].isspace():
                pos += 1
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ValueError("unexpected end of expression")
        self.i += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.unary()
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            sign = self.take()
            value = self.unary()
            return -value if sign == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() != "**":
            return base
        self.take()
        exp = self.unary()
        if exp.denominator != 1 or abs(exp) > MAX_EXPONENT:
            raise ValueError(f"exponent must be an integer of at most {MAX_EXPONENT}")
        if base == 0 and exp < 0:
            raise ValueError("division by zero")
        return base ** int(exp)

    def atom(self) -> Fraction:
        tok = self.take()
        if tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise ValueError("missing ')'")
            return value
        if tok[0].isdigit():
            return Fraction(tok)
        raise ValueError(f"unexpected {tok!r}")


def evaluate_expression(expression: str) -> Fraction:
    """The exact value of an arithmetic expression (integers, decimals, `+ - * / **`,
    parentheses). Raises `ValueError` on anything else."""
    p = _Parser(expression)
    if not p.tokens:
        raise ValueError("empty expression")
    value = p.expr()
    if p.peek() is not None:
        raise ValueError(f"unexpected {p.peek()!r}")
    if len(str(value.numerator)) + len(str(value.denominator)) > MAX_DIGITS:
        raise ValueError("result too large")
    return value


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (integers and fractions).

    Args:
        expression: e.g. "12345*678" or "(3+4)/7" (+ - * / ** and parentheses)
    """
    try:
        value = evaluate_expression(expression)
    except ValueError as e:
        return f"error: {e}"
    return str(value.numerator) if value.denominator == 1 else f"{value}"


# --------------------------------------------------------------------------------------
# python: a program in the code sandbox
# --------------------------------------------------------------------------------------

_RUNNER = """
def signalrl_tool_run():
    import contextlib, io, traceback
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            exec(compile(CODE, "<tool>", "exec"), {"__name__": "__main__"})
        except BaseException:
            traceback.print_exc(limit=2)
    out = buf.getvalue()[:LIMIT]
    while len(repr(out)) > LIMIT + 2:  # what comes back is the repr, in a capped message
        out = out[: len(out) * 9 // 10]
    return out
"""
_MARK = "SIGNALRL_TOOL_OUTPUT="


def make_python_tool(timeout: float = 5.0, sandbox: str = "auto") -> Tool:
    """The `python` tool: runs a program in the sandbox pool with `timeout` seconds of
    wall clock; the observation is its stdout and stderr (at most `PYTHON_OUTPUT_CHARS`)."""

    def python(code: str) -> str:
        """Run a Python program and return what it prints.

        Args:
            code: the program; print the values you need
        """
        from signalrl.rewards.sandbox import run_python_tests

        program = f"CODE = {code!r}\nLIMIT = {PYTHON_OUTPUT_CHARS}\n{_RUNNER}"
        head, tail = _MARK[:8], _MARK[8:]  # the whole mark is only in the message
        test = f"raise AssertionError({head!r} + {tail!r} + repr(signalrl_tool_run()))"
        (out,) = run_python_tests(program, [test], timeout=timeout, sandbox=sandbox)
        if out.status == "timeout":
            return f"error: the program did not finish within {timeout:g} s"
        at = out.detail.rfind(_MARK)
        if at < 0:
            return f"error: the program failed ({out.status})"
        import ast

        try:
            return str(ast.literal_eval(out.detail[at + len(_MARK) :].strip()))
        except (ValueError, SyntaxError):
            return "error: the program's output could not be read back"

    return Tool(python)  # the sandbox keeps the clock (and kills the program)


BUILTIN_TOOLS: dict[str, Callable[..., Tool]] = {
    "calculator": lambda timeout=5.0, **_: Tool(calculator, timeout=timeout),
    "python": lambda timeout=5.0, sandbox="auto", **_: make_python_tool(timeout, sandbox),
}


def load_tools(names: Sequence[str], timeout: float = 5.0, sandbox: str = "auto") -> list[Tool]:
    """Built-in tools by name, or `module:function` for a typed function of your own."""
    from signalrl.envs.base import load_object

    out: list[Tool] = []
    for name in names:
        if name in BUILTIN_TOOLS:
            out.append(BUILTIN_TOOLS[name](timeout=timeout, sandbox=sandbox))
        elif ":" in name:
            out.append(Tool(load_object(name, f"env.tools: {name}"), timeout=timeout))
        else:
            raise ValueError(
                f"env.tools: unknown tool {name!r}; built-in: {', '.join(BUILTIN_TOOLS)} "
                "(or 'module:function' for your own)"
            )
    if len({t.name for t in out}) != len(out):
        raise ValueError(f"env.tools: two tools share a name: {[t.name for t in out]}")
    return out
