"""Registries of named pure functions: advantage estimators, policy losses, preference losses.

A registry maps a name to a function with the registry's one documented signature. Built-in
entries are registered with a decorator in the module that defines them::

    @register_policy_loss("cispo")
    def cispo(x: PolicyLossInput) -> tuple[Tensor, dict[str, float]]: ...

and a recipe selects an entry by name (`rl.loss_type: cispo`) or names a user function as
`module:function` (`rl.loss_type: mylosses:my_loss`), which must have the same signature.

Config validation must not import torch (a recipe is checked before any model is loaded), so
`names()` reads the built-in names and their literal keyword metadata from the decorators in
the defining modules' source (`ast`), without importing them; `get()` imports the modules and
returns the function. A test checks that both views agree. See `docs/architecture.md`.

This module imports only the standard library.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def import_function(spec: str, what: str = "function") -> Callable[..., Any]:
    """The callable named by `'module:function'` (`module` importable, dotted attributes
    allowed after the colon); a ValueError names the spec and what went wrong."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"{what} {spec!r}: expected 'module:function'")
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import module {mod!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: module {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is not callable")
    return obj


class Registry:
    """Name -> function, for one kind of piece (`kind` is used in messages).

    `modules` are the modules whose decorators (`@<decorator>("name", key=literal, ...)`)
    define the built-in entries."""

    def __init__(self, kind: str, decorator: str, modules: tuple[str, ...]) -> None:
        self.kind, self.decorator, self.modules = kind, decorator, modules
        self._fns: dict[str, Callable[..., Any]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    # -- defining entries ------------------------------------------------------------------
    def register(self, name: str, **meta: Any) -> Callable[[F], F]:
        """Decorator: register `fn` under `name`; `meta` (literal values only, so that they
        can be read without importing) is kept as `meta(name)`."""

        def deco(fn: F) -> F:
            if name in self._fns and self._fns[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._fns[name] = fn
            self._meta[name] = dict(meta)
            return fn

        return deco

    # -- reading without importing ----------------------------------------------------------
    def declared(self) -> dict[str, dict[str, Any]]:
        """Built-in names and their metadata, read from the defining modules' source."""
        return _declared(self.decorator, self.modules)

    def names(self) -> tuple[str, ...]:
        return tuple(self.declared())

    def check(self, name: str) -> str:
        """`name` if it is a built-in entry or an importable `module:function`; otherwise a
        ValueError listing the valid names. Does not import the built-in modules."""
        if name in self.declared():
            return name
        if ":" in name:
            import_function(name, f"{self.kind} function")
            return name
        raise ValueError(
            f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())} "
            "(or a user function as 'module:function')"
        )

    def declared_meta(self, name: str, key: str, default: Any = None) -> Any:
        """Metadata `key` of a built-in entry, read without importing (default for a user
        function or a missing key)."""
        return self.declared().get(name, {}).get(key, default)

    # -- using entries ------------------------------------------------------------------------
    def load(self) -> None:
        for m in self.modules:
            importlib.import_module(m)

    def get(self, name: str) -> Callable[..., Any]:
        """The function for a built-in name or a `module:function` spec."""
        self.load()
        if name in self._fns:
            return self._fns[name]
        if ":" in name:
            return import_function(name, f"{self.kind} function")
        raise ValueError(
            f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._fns))} "
            "(or a user function as 'module:function')"
        )

    def meta(self, name: str, key: str, default: Any = None) -> Any:
        """Metadata of an entry: the registered keywords of a built-in, or an attribute of
        the same name on a user function (e.g. `fn.needs_values = True`)."""
        self.load()
        if name in self._meta:
            return self._meta[name].get(key, default)
        return getattr(self.get(name), key, default)

    def registered(self) -> dict[str, Callable[..., Any]]:
        self.load()
        return dict(self._fns)


@cache
def _declared(decorator: str, modules: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for mod in modules:
        spec = importlib.util.find_spec(mod)
        if spec is None or spec.origin is None:
            raise ImportError(f"registry module {mod!r} not found")
        tree = ast.parse(Path(spec.origin).read_text(), filename=spec.origin)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for d in node.decorator_list:
                if not (isinstance(d, ast.Call) and _name(d.func) == decorator and d.args):
                    continue
                name = ast.literal_eval(d.args[0])
                out[name] = {k.arg: ast.literal_eval(k.value) for k in d.keywords if k.arg}
    return out


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


ADVANTAGES = Registry(
    "advantage estimator",
    "register_advantage",
    ("signalrl.losses.advantages", "signalrl.losses.advantages_frontier"),
)
POLICY_LOSSES = Registry(
    "policy loss",
    "register_policy_loss",
    ("signalrl.losses.policy", "signalrl.losses.policy_frontier"),
)
PREFERENCE_LOSSES = Registry(
    "preference loss",
    "register_preference_loss",
    ("signalrl.losses.dpo", "signalrl.losses.preference"),
)

register_advantage = ADVANTAGES.register
register_policy_loss = POLICY_LOSSES.register
register_preference_loss = PREFERENCE_LOSSES.register
