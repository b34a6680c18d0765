"""Environments and tools for multi-turn rollouts (`signalrl.rollout.multiturn`)."""

from signalrl.envs.base import (
    Environment,
    EnvStep,
    SingleTurnEnv,
    ToolEnv,
    first_messages,
    load_object,
    make_env_factory,
)
from signalrl.envs.tools import (
    BUILTIN_TOOLS,
    Tool,
    ToolCall,
    ToolCallError,
    calculator,
    evaluate_expression,
    load_tools,
    make_python_tool,
    parse_tool_calls,
)

__all__ = [
    "BUILTIN_TOOLS",
    "EnvStep",
    "Environment",
    "SingleTurnEnv",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolEnv",
    "calculator",
    "evaluate_expression",
    "first_messages",
    "load_object",
    "load_tools",
    "make_env_factory",
    "make_python_tool",
    "parse_tool_calls",
]
