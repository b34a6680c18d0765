"""Tools (signalrl.envs.tools): schemas, strict call parsing, the calculator, the python tool
and the preset chat template's rendering of `tools=` and `tool` messages."""

from __future__ import annotations

import builtins
import json
import time

import pytest

from signalrl.envs.tools import (
    Tool,
    ToolCall,
    ToolCallError,
    calculator,
    evaluate_expression,
    load_tools,
    make_python_tool,
    parse_tool_calls,
)


def add(a: int, b: int, note: str = "") -> int:
    """Add two integers.

    Args:
        a: the first integer
        b: the second integer
        note: ignored
    """
    return a + b


def _tools() -> dict[str, Tool]:
    return {"add": Tool(add), "calculator": Tool(calculator)}


def test_schema_from_signature_and_docstring():
    s = Tool(add).schema
    assert s["type"] == "function"
    f = s["function"]
    assert f["name"] == "add" and f["description"] == "Add two integers."
    assert f["parameters"]["properties"]["a"] == {
        "type": "integer",
        "description": "the first integer",
    }
    assert f["parameters"]["required"] == ["a", "b"]
    calc = Tool(calculator).schema["function"]
    assert calc["name"] == "calculator"
    assert calc["parameters"]["properties"]["expression"]["type"] == "string"


def test_parse_valid_calls_in_order():
    text = (
        'first <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> then '
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*3"}}\n</tool_call>'
    )
    calls = parse_tool_calls(text, _tools())
    assert calls == [
        ToolCall("add", {"a": 1, "b": 2}),
        ToolCall("calculator", {"expression": "2*3"}),
    ]
    assert parse_tool_calls("no call here: 42", _tools()) == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"name": "add", "arguments": {"a": 1, "b": 2}', "not valid JSON"),
        ('["add"]', "must be a JSON object"),
        ('{"arguments": {}}', "no 'name'"),
        ('{"name": "sub", "arguments": {}}', "unknown tool 'sub'"),
        ('{"name": "add", "arguments": {"a": 1}}', "missing argument(s) b"),
        ('{"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}}', "unknown argument(s) c"),
        ('{"name": "add", "arguments": {"a": "1", "b": 2}}', "argument a must be a JSON integer"),
        ('{"name": "add", "arguments": {"a": true, "b": 2}}', "argument a must be a JSON integer"),
        ('{"name": "add", "arguments": [1, 2]}', "'arguments' must be a JSON object"),
        ('{"name": "add", "arguments": {"a": 1, "b": 2}, "id": 7}', "unknown key(s) id"),
    ],
)
def test_malformed_calls_are_errors_with_a_reason(body, message):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>", _tools())
    assert isinstance(call, ToolCallError)
    assert message in str(call), str(call)


def test_unclosed_call_is_an_error():
    calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', _tools())
    assert len(calls) == 1 and isinstance(calls[0], ToolCallError)
    assert "not closed" in str(calls[0])


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("123456*654321", "80779853376"),
        ("987654321987654321+123456789123456789", "1111111111111111110"),
        ("2+3*4", "14"),
        ("(2+3)*4", "20"),
        ("-3--4", "1"),
        ("1/3+1/6", "1/2"),
        ("7/7", "1"),
        ("2**100", str(2**100)),
        ("2**-2", "1/4"),
        ("0.1+0.2", "3/10"),
        ("-2**2", "-4"),
    ],
)
def test_calculator_is_exact(expr, value):
    assert calculator(expr) == value


@pytest.mark.parametrize(
    "expr",
    ["__import__('os').system('true')", "1+", "(1+2", "1/0", "2**1000000", "", "1 2", "abs(-1)"],
)
def test_calculator_rejects_what_is_not_arithmetic(expr):
    assert calculator(expr).startswith("error:")


def test_calculator_never_calls_eval(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("eval called")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    assert calculator("12345*6789") == str(12345 * 6789)
    assert evaluate_expression("(1+2)/3") == 1


def test_load_tools_names_and_errors():
    assert [t.name for t in load_tools(["calculator", "python"])] == ["calculator", "python"]
    assert load_tools(["test_tools:add"])[0].name == "add"
    with pytest.raises(ValueError, match="unknown tool 'abacus'"):
        load_tools(["abacus"])
    with pytest.raises(ValueError, match="two tools share a name"):
        load_tools(["calculator", "calculator"])


def test_in_process_tool_timeout_and_raise():
    def slow(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "woke"

    tool = Tool(slow, timeout=0.2)
    assert tool({"seconds": 0.0}) == "woke"
    with pytest.raises(ToolCallError, match="did not finish within 0.2 s"):
        tool({"seconds": 5.0})

    def bad(x: int) -> int:
        """Fail.

        Args:
            x: anything
        """
        raise RuntimeError(f"bad {x}")

    with pytest.raises(RuntimeError, match="bad 3"):
        Tool(bad, timeout=1.0)({"x": 3})


def test_python_tool_output_errors_and_limits():
    py = make_python_tool(timeout=2.0)
    assert py({"code": "print(sum(range(101)))"}) == "5050\n"
    assert "ZeroDivisionError" in py({"code": "print(1/0)"})
    long = py({"code": "print('x' * 5000)"})
    assert 0 < len(long) <= 700 and set(long) == {"x"}
    lines = py({"code": "for i in range(2000):\n    print(i)"})
    assert lines.startswith("0\n1\n2\n") and len(repr(lines)) <= 702
    out = make_python_tool(timeout=1.0)({"code": "while True:\n    pass"})
    assert out == "error: the program did not finish within 1 s"


def test_preset_template_renders_tools_and_tool_messages():
    from signalrl.models.tokenizer import build_tokenizer

    tok = build_tokenizer("bpe")
    msgs = [
        {"role": "user", "content": "What is 2*3?"},
        {"role": "assistant", "content": "call"},
        {"role": "tool", "content": "6"},
    ]
    plain = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert plain == (
        "<|im_start|>user\nWhat is 2*3?<|im_end|>\n<|im_start|>assistant\ncall<|im_end|>\n"
        "<|im_start|>tool\n6<|im_end|>\n<|im_start|>assistant\n"
    )
    schema = Tool(calculator).schema
    with_tools = tok.apply_chat_template(
        [{"role": "system", "content": "Be exact."}, *msgs],
        tools=[schema],
        tokenize=False,
        add_generation_prompt=True,
    )
    head, rest = with_tools.split("<|im_end|>\n", 1)
    assert head.startswith("<|im_start|>system\nBe exact.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(schema) + "\n</tools>" in head
    assert rest == plain  # the system message went into the tools turn, the rest unchanged
