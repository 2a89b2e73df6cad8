"""Inline a simple hook's body into a compiled run (see :mod:`resilience.hooks`).

A compiled run calls each layer's ``enter`` and ``leave`` hook; each call is a Python frame
(tens of nanoseconds, about 150-200 interpreter instructions), several per message. For a hook
whose body is simple, the run can instead contain the body itself, read from the hook's source
when the pipeline is built: the hook function stays the one place its logic is written, and
the run is a mechanical translation of it.

The translation is conservative; anything it does not recognise stays a call:

* only the exact function found on the layer's class (``type(layer).enter``), a plain
  ``def`` without decorators, closure, defaults in use, ``*args`` or keyword-only parameters,
  whose source is available and compiles to the code the function runs;
* a body without loops, ``with``, ``await``, ``yield``, ``lambda``, nested functions or classes,
  comprehensions, ``global`` / ``nonlocal``, imports, ``match``, ``:=``, star-arguments,
  ``super()`` / ``__class__``, private (mangled) ``__names`` or the frame builtins
  (``locals``, ``vars``, ``eval``, ...), and that never rebinds a parameter;
* every name it reads that is not a parameter or local is a builtin, or a module-level name
  its module binds exactly once (a ``def``, ``class``, import or single assignment at the top
  level, never named in a ``global`` statement). Such names are **read once, when the
  pipeline is built**, and bound into the run's namespace.

``self`` becomes a name bound to the layer, the parameters the run's own values, and the
locals are renamed with a prefix unique to the hook. A statement that calls another method of
the layer, ``self.m(a, b)`` (positional arguments that are names or literals, the value
unused), becomes that method's body by the same rules when it is simple, up to three levels
deep; otherwise it stays a call.

The layer's fixed configuration is **read once, when the pipeline is built**, too
(:func:`fold_fixed`, a pass over the translated body): a read ``self.NAME`` of an attribute
that cannot change once written (a field of a frozen dataclass layer, or a name a
:class:`FixedAttributes` layer declares in ``fixed_attributes``, which it then refuses to
assign again or delete) becomes its value, a literal for ``None``, a bool, a non-negative
number or a string and otherwise a name bound to the very object. Tests that are then
constant (``not``, ``is None``, comparisons of literals, ``and`` / ``or`` with Python's short
circuit and values, ``if`` / ``elif``, ``x if C else y``) are decided and their dead branches
dropped; a local assigned a literal once, and read only after that, is replaced by it. Only
``object.__setattr__`` changes such an attribute behind the guard, and a run built before
keeps the value it read. ``return X`` becomes an assignment of
``X`` to the hook's result: an ``if`` that returns has the rest of the body copied into its
branches, and a return anywhere else (inside ``try``) makes the body a ``while True:`` block
left by ``break``.

Given a :class:`Sentinel` (an ``enter`` hook: the run's ``SLOW_PATH``), returns in the
``if``-folded form are translated by what they return:

* a name read at build time whose value *is* the sentinel (``return SLOW_PATH``): the
  sentinel's exit statements, in place of the return (no assignment, no check);
* a value known not to be the sentinel: the assignment alone. Known are constants, new
  containers (tuple, list, set, dict displays, f-strings), ``not x``, ``is`` / ``is not`` /
  ``in`` / ``not in`` tests, ``and`` / ``or`` / ``x if c else y`` of known values, ``self``,
  a build-time name bound to anything else, a local whose every binding is a plain assignment
  of a known value, and a name that an ``if`` test ``name < number`` (``<=``, ``>``, ``>=``,
  either side; ``number`` an int or float literal) evaluated on every path to the return
  without the name being rebound since (the sentinel has no order: the test would have raised);
* anything else (a call's result, an attribute, a subscript, arithmetic, a parameter): the
  assignment, then ``if result is <sentinel name>:`` and the exit statements.

In the ``while True:`` form the exit statements could not leave the run (a ``break`` in them
would leave the inner block), so every value is assigned and :attr:`Inlined.unchecked` asks
the caller to check the result after the block.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import inspect
import math
import operator
import sys
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

__all__ = ["FixedAttributes", "Inlined", "Sentinel", "fold_fixed", "inline_hook"]

_REJECTED: tuple[type[ast.AST], ...] = (
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.With,
    ast.AsyncWith,
    ast.Await,
    ast.Yield,
    ast.YieldFrom,
    ast.Lambda,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
    ast.Global,
    ast.Nonlocal,
    ast.Import,
    ast.ImportFrom,
    ast.Match,
    ast.NamedExpr,
    ast.Starred,
    ast.Break,
    ast.Continue,
    ast.TryStar,
)

_FRAME_NAMES = frozenset(
    {"super", "__class__", "locals", "vars", "dir", "eval", "exec", "globals", "compile"}
)
"""Names whose meaning depends on the frame they are called in."""

_GROWTH = 4
"""How many times its own size a body may grow when returns are folded into ``if`` branches."""


@dataclass(frozen=True, slots=True)
class Inlined:
    """A hook body ready to paste into a run.

    Attributes:
        lines: Statements, unindented, that compute the hook (its result assigned to the
            result name, when it may return something other than ``None``).
        namespace: Names the statements read that the run's namespace must bind.
        returns_value: Whether some path returns something other than ``None`` (and so
            assigns the result name); when ``False`` the statements assign nothing.
        exits: Whether the statements contain the :class:`Sentinel`'s exit (see there).
        unchecked: Whether the result name may hold the sentinel after the statements (the
            body could not take the exit where it returns it: check the result).
    """

    lines: tuple[str, ...]
    namespace: dict[str, Any] = field(default_factory=dict)
    returns_value: bool = True
    exits: bool = False
    unchecked: bool = False


@dataclass(frozen=True, slots=True)
class Sentinel:
    """A return value that leaves the body by statements of the caller's instead of being
    assigned (see the module text).

    Attributes:
        value: The object (a run's ``SLOW_PATH``).
        name: The run's name for it.
        exit: The statements to run where the body returns it.
    """

    value: object
    name: str
    exit: tuple[str, ...]


def inline_hook(
    layer: object,
    name: str,
    args: tuple[str, ...],
    result: str,
    prefix: str,
    sentinel: Sentinel | None = None,
    _depth: int = 0,
) -> Inlined | None:
    """The body of ``layer``'s hook ``name`` written for a run, or ``None`` to call it.

    A statement of the body that calls another method of the same layer, ``self.m(a, b)``
    (its value unused, its arguments names or literals), is that method's body in turn, when
    it is simple (:func:`_paste_own_calls`): a hook that delegates part of its work keeps
    that part in one method without a call per message.

    Args:
        layer: The layer.
        name: ``"enter"`` or ``"leave"``.
        args: The run's names for the hook's parameters after ``self``.
        result: The run's name for the hook's return value.
        prefix: Prefix unique to this hook in the run, for its locals and bound names.
        sentinel: A value whose return takes the caller's exit instead (see the module text).

    Returns:
        The inlined form, or ``None`` when the hook is not simple enough (see the module text).
    """
    function = getattr(type(layer), name, None)
    bound = getattr(layer, name, None)
    if not isinstance(function, types.FunctionType) or not isinstance(bound, types.MethodType):
        return None
    if bound.__func__ is not function or bound.__self__ is not layer:
        return None  # replaced on the instance, or a wrapper: call what is there
    translated = _translate(function, args, result, prefix, sentinel)
    if translated is None:
        return None
    namespace = dict(translated.namespace)
    namespace[prefix + "self"] = layer
    folded = fold_fixed(
        layer,
        Inlined(
            translated.lines,
            namespace,
            translated.returns_value,
            translated.exits,
            translated.unchecked,
        ),
        prefix,
    )
    return _paste_own_calls(layer, folded, prefix, _depth)


_NESTING = 3
"""How deep :func:`_paste_own_calls` pastes methods called by pasted methods."""


def _paste_own_calls(layer: object, inlined: Inlined, prefix: str, depth: int) -> Inlined:
    """``inlined`` with each statement ``self.m(args)`` replaced by ``m``'s inlined body.

    Only a call whose value is unused, with positional arguments that are names or literals
    (each then read where ``m`` reads its parameter: ``m`` never rebinds one, and its locals
    are renamed apart), of a method ``inline_hook`` can translate; ``m``'s own such calls are
    pasted likewise, up to :data:`_NESTING` levels. Anything else stays a call.
    """
    if depth >= _NESTING or not any(prefix + "self." in line for line in inlined.lines):
        return inlined
    self_name = prefix + "self"
    tree = ast.parse("\n".join(inlined.lines))
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | set(inlined.namespace)
    namespace = dict(inlined.namespace)
    pasted = False

    def paste(statement: ast.stmt) -> list[ast.stmt] | None:
        call = statement.value if isinstance(statement, ast.Expr) else None
        if not isinstance(call, ast.Call) or call.keywords:
            return None
        method = call.func
        if not (
            isinstance(method, ast.Attribute)
            and isinstance(method.value, ast.Name)
            and method.value.id == self_name
            and all(isinstance(a, ast.Name) or _is_literal(a) for a in call.args)
        ):
            return None
        inner = f"{prefix}{method.attr}_"
        if any(name.startswith(inner) for name in used):
            return None  # its names could meet this body's: leave the call
        body = inline_hook(
            layer,
            method.attr,
            tuple(ast.unparse(a) for a in call.args),
            inner + "result",
            inner,
            None,
            depth + 1,
        )
        if body is None:
            return None
        namespace.update(body.namespace)
        return ast.parse("\n".join(body.lines)).body

    for statements in _blocks(tree.body):  # listed before any paste: pasted bodies are done
        out: list[ast.stmt] = []
        for statement in statements:
            replaced = paste(statement)
            out += [statement] if replaced is None else replaced
            pasted = pasted or replaced is not None
        statements[:] = out
    if not pasted:
        return inlined
    module = ast.fix_missing_locations(ast.Module(body=tree.body, type_ignores=[]))
    return dataclasses.replace(
        inlined, lines=tuple(ast.unparse(module).splitlines()), namespace=namespace
    )


@functools.lru_cache(maxsize=1024)
def _translate(
    function: types.FunctionType,
    args: tuple[str, ...],
    result: str,
    prefix: str,
    sentinel: Sentinel | None = None,
) -> Inlined | None:
    """``function``'s body for a run (every layer of a class shares it: building a pipeline
    translates each hook once, whatever the number of pipelines and runs)."""
    definition = _definition(function)
    if definition is None:
        return None
    try:
        return _Translation(function, definition, args, result, prefix, sentinel).run()
    except _NotSimple:
        return None


_Assign = Callable[[ast.expr | None], list[ast.stmt]]
"""Statements storing a returned value (``None``: a bare return) in the hook's result."""


class _NotSimple(Exception):
    """The body uses something the translation does not handle."""


def _definition(function: types.FunctionType) -> ast.FunctionDef | None:
    """The parsed ``def`` of ``function``, checked to compile to the code it runs."""
    code = function.__code__
    if code.co_freevars or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        return None
    if code.co_flags & (inspect.CO_COROUTINE | inspect.CO_GENERATOR):
        return None
    home = sys.modules.get(function.__module__)
    if home is None or vars(home) is not function.__globals__:
        return None  # not defined by its module's source (``exec``, a copied function)
    module = _module(function.__module__)
    if module is None:
        return None
    # The source on disk may have changed since the module was imported: inline only a body
    # that the module's source compiles to exactly the instructions the function runs.
    twin = module.code_at.get((code.co_firstlineno, code.co_name))
    if twin is None or not _same_code(twin, code):
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError, ValueError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    definition = tree.body[0]
    arguments = definition.args
    if definition.decorator_list or definition.name != code.co_name:
        return None
    if arguments.posonlyargs or arguments.kwonlyargs or arguments.vararg or arguments.kwarg:
        return None
    return definition


@dataclass(frozen=True, slots=True)
class _Module:
    """What the inliner needs of a module's source (kept small: no syntax tree is cached, so
    the collector has no extra objects to walk)."""

    code_at: dict[tuple[int, str], types.CodeType]
    """The source's code objects by first line and name."""
    constants: frozenset[str]
    """Module-level names bound exactly once and never declared ``global``."""


@functools.lru_cache(maxsize=64)
def _module(module_name: str) -> _Module | None:
    """The source of ``module_name`` as it reads now, compiled (``None``: no source)."""
    module = sys.modules.get(module_name)
    if module is None:
        return None
    try:
        source = inspect.getsource(module)
        tree = ast.parse(source)
        code = compile(tree, inspect.getfile(module), "exec", dont_inherit=True)
    except (OSError, TypeError, SyntaxError, ValueError):
        return None
    code_at: dict[tuple[int, str], types.CodeType] = {}
    pending = [code]
    while pending:
        current = pending.pop()
        for const in current.co_consts:
            if isinstance(const, types.CodeType):
                code_at.setdefault((const.co_firstlineno, const.co_name), const)
                pending.append(const)
    return _Module(code_at, _constant_names(tree, "global" in source))


def _same_code(a: types.CodeType, b: types.CodeType) -> bool:
    return (
        a.co_code == b.co_code
        and a.co_names == b.co_names
        and a.co_varnames == b.co_varnames
        and a.co_consts == b.co_consts
    )


def _constant_names(tree: ast.Module, declares: bool) -> frozenset[str]:
    """Module-level names of ``tree`` bound exactly once and never declared global
    (``declares``: the source contains the word ``global`` anywhere, so look for the
    statement)."""
    counts: dict[str, int] = {}

    def bind(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    def targets(node: ast.AST) -> None:
        for child in ast.walk(node):
            if isinstance(child, ast.Name) and isinstance(child.ctx, (ast.Store, ast.Del)):
                bind(child.id)

    declared: set[str] = set()
    if declares:
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                declared.update(node.names)

    def top(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bind(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    bind((alias.asname or alias.name).split(".")[0])
            elif isinstance(node, (ast.If, ast.Try)):
                # Conditional bindings (``if TYPE_CHECKING:``, ``try: import``) count everywhere.
                for block in ("body", "orelse", "finalbody"):
                    top(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    top(handler.body)
            else:
                targets(node)

    top(tree.body)
    return frozenset(name for name, count in counts.items() if count == 1 and name not in declared)


class _Translation:
    """One hook's body rewritten for a run."""

    def __init__(
        self,
        function: types.FunctionType,
        definition: ast.FunctionDef,
        args: tuple[str, ...],
        result: str,
        prefix: str,
        sentinel: Sentinel | None = None,
    ) -> None:
        self.function = function
        self.definition = definition
        self.result = result
        self.prefix = prefix
        self.sentinel = sentinel
        params = [a.arg for a in definition.args.args]
        if len(params) != len(args) + 1:
            raise _NotSimple
        self.params = dict(zip(params, (prefix + "self", *args), strict=True))
        self.namespace: dict[str, Any] = {}
        self.returns_value = False
        self.assigned: dict[str, list[ast.expr] | None] = {}
        """Each local's assigned values (``None``: bound some other way too)."""
        self.ordered: dict[int, frozenset[str]] = {}
        """By returned expression (its ``id``): names an ordering test has seen (see
        :meth:`_order`)."""

    def run(self) -> Inlined:
        body = self.definition.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        body = [self._plain(statement) for statement in body]
        locals_ = self._check(body)
        self._rename(body, locals_)
        returned = [
            node.value
            for statement in body
            for node in ast.walk(statement)
            if isinstance(node, ast.Return)
        ]
        sentinel = self.sentinel
        if sentinel is not None:
            self._collect(body)
            self._order(body, frozenset())
        # ``maybe``: returns whose value may be the sentinel, taking the exit or a check.
        maybe = sentinel is not None and any(not self._returns_other(value) for value in returned)
        self.returns_value = any(
            not _is_none(value) and not self._is_sentinel(value) for value in returned
        )
        folded = _fold(body, self._assign)
        size = sum(1 for s in body for _ in ast.walk(s)) or 1
        if folded is not None and sum(1 for s in folded for _ in ast.walk(s)) <= _GROWTH * size:
            statements, exits, unchecked = folded, maybe, False
        else:
            # Inside the ``while True:`` block the exit's own statements may not work (a
            # ``break`` would leave that block): every value is assigned, the caller checks.
            self.returns_value = any(not _is_none(value) for value in returned)
            self.sentinel = None
            statements, exits, unchecked = [self._loop(body)], False, maybe
        if not statements:
            statements = [ast.Pass()]
        module = ast.fix_missing_locations(ast.Module(body=statements, type_ignores=[]))
        return Inlined(
            tuple(ast.unparse(module).splitlines()),
            self.namespace,
            self.returns_value,
            exits,
            unchecked,
        )

    # -- checks --------------------------------------------------------------------------------

    @staticmethod
    def _plain(statement: ast.stmt) -> ast.stmt:
        """A local annotation (never evaluated in a function) dropped: ``x: T = v`` -> ``x = v``."""
        if isinstance(statement, ast.AnnAssign):
            if statement.value is None or not statement.simple:
                raise _NotSimple
            return ast.copy_location(
                ast.Assign(targets=[statement.target], value=statement.value), statement
            )
        for name in ("body", "orelse", "finalbody"):
            block = getattr(statement, name, None)
            if isinstance(block, list):
                setattr(statement, name, [_Translation._plain(s) for s in block])
        for handler in getattr(statement, "handlers", []):
            handler.body = [_Translation._plain(s) for s in handler.body]
        return statement

    def _check(self, body: list[ast.stmt]) -> set[str]:
        """The body's locals; raises :class:`_NotSimple` for anything not handled."""
        locals_: set[str] = set()
        for statement in body:
            for node in ast.walk(statement):
                if isinstance(node, _REJECTED):
                    raise _NotSimple
                if isinstance(node, ast.AnnAssign):
                    raise _NotSimple  # nested in a block the plain pass missed
                if isinstance(node, ast.keyword) and node.arg is None:
                    raise _NotSimple  # **kwargs
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr.startswith("__")
                    and not node.attr.endswith("__")
                ):
                    raise _NotSimple  # a private name, mangled only inside its class
                if isinstance(node, ast.Try) and any(
                    isinstance(n, ast.Return) for s in node.finalbody for n in ast.walk(s)
                ):
                    raise _NotSimple
                if isinstance(node, ast.Name):
                    if node.id in _FRAME_NAMES:
                        raise _NotSimple
                    if isinstance(node.ctx, (ast.Store, ast.Del)):
                        if node.id in self.params:
                            raise _NotSimple  # rebinding a parameter would rebind the run's
                        locals_.add(node.id)
                elif isinstance(node, ast.ExceptHandler) and node.name is not None:
                    if node.name in self.params:
                        raise _NotSimple
                    locals_.add(node.name)
        return locals_

    def _rename(self, body: list[ast.stmt], locals_: set[str]) -> None:
        """Parameters to the run's names, locals and globals to prefixed names."""
        function = self.function
        module = _module(function.__module__)
        constants = module.constants if module is not None else frozenset()
        names = self.params
        prefix = self.prefix
        for statement in body:
            for node in ast.walk(statement):
                if isinstance(node, ast.ExceptHandler) and node.name is not None:
                    node.name = prefix + node.name
                if not isinstance(node, ast.Name):
                    continue
                name = node.id
                if name in names:
                    node.id = names[name]
                elif name in locals_:
                    node.id = prefix + name
                elif name.startswith("__"):
                    raise _NotSimple
                elif name in function.__globals__:
                    if name not in constants:
                        raise _NotSimple  # the module may rebind it: read it at each call
                    node.id = prefix + name
                    self.namespace[node.id] = function.__globals__[name]
                elif hasattr(builtins, name):
                    node.id = prefix + name
                    self.namespace[node.id] = getattr(builtins, name)
                else:
                    raise _NotSimple  # a NameError when called: let the call raise it

    # -- returns -------------------------------------------------------------------------------

    def _collect(self, body: list[ast.stmt]) -> None:
        """Fill :attr:`assigned`: for each local, the values a plain ``name = value`` gives it
        (the body has no loops, ``with`` or ``:=``: every other binding is one of those below)."""
        for statement in body:
            for node in ast.walk(statement):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            known = self.assigned.setdefault(target.id, [])
                            if known is not None:
                                known.append(node.value)
                        else:
                            self._unknown(target)
                elif isinstance(node, (ast.AugAssign, ast.Delete)):
                    self._unknown(node)
                elif isinstance(node, ast.ExceptHandler) and node.name is not None:
                    self.assigned[node.name] = None

    def _unknown(self, node: ast.AST) -> None:
        for name in ast.walk(node):
            if isinstance(name, ast.Name):
                self.assigned[name.id] = None

    def _is_sentinel(self, value: ast.expr | None) -> bool:
        """Whether ``value`` is a name read at build time whose value is the sentinel."""
        sentinel = self.sentinel
        return (
            sentinel is not None
            and isinstance(value, ast.Name)
            and value.id in self.namespace
            and self.namespace[value.id] is sentinel.value
        )

    def _order(self, statements: list[ast.stmt], ordered: frozenset[str]) -> frozenset[str]:
        """Fill :attr:`ordered` for the returns in ``statements``, reached with ``ordered``
        (names compared with a number on every path here and not rebound since); the names so
        known after the statements."""
        for statement in statements:
            if isinstance(statement, ast.Return):
                self.ordered[id(statement.value)] = ordered
            elif isinstance(statement, ast.If):
                ordered |= _ordered(statement.test)  # the test runs on every path through
                after = [
                    self._order(statement.body, ordered),
                    self._order(statement.orelse, ordered),
                ]
                ordered = after[0] & after[1]
            elif isinstance(statement, ast.Try):
                for block in (statement.body, statement.orelse, statement.finalbody):
                    self._order(block, frozenset())
                for handler in statement.handlers:
                    self._order(handler.body, frozenset())
                ordered = frozenset()  # conservative: what a try block leaves known is not kept
            else:
                bound = {
                    node.id
                    for node in ast.walk(statement)
                    if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)
                }
                ordered -= bound
        return ordered

    def _returns_other(self, value: ast.expr | None) -> bool:
        """Whether the returned ``value`` is known not to be the sentinel."""
        return self._other(value, ordered=self.ordered.get(id(value), frozenset()))

    def _other(
        self,
        value: ast.expr | None,
        seen: frozenset[str] = frozenset(),
        ordered: frozenset[str] = frozenset(),
    ) -> bool:
        """Whether ``value`` is known not to be the sentinel (see the module text); the names
        in ``ordered`` are (an ordering test with a number saw them)."""
        if value is None or isinstance(value, (ast.Constant, ast.JoinedStr)):
            return True
        if isinstance(value, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            return True  # a new object
        if isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.Not):
            return True
        if isinstance(value, ast.Compare):
            return all(isinstance(op, (ast.Is, ast.IsNot, ast.In, ast.NotIn)) for op in value.ops)
        if isinstance(value, ast.BoolOp):
            return all(self._other(operand, seen, ordered) for operand in value.values)
        if isinstance(value, ast.IfExp):
            return self._other(value.body, seen, ordered) and self._other(
                value.orelse, seen, ordered
            )
        if isinstance(value, ast.Name):
            name = value.id
            if name in self.namespace:  # read at build time: its value is known
                return self.sentinel is None or self.namespace[name] is not self.sentinel.value
            if name == self.prefix + "self" or name in ordered:
                return True  # the layer; a name an ordering test with a number has seen
            values = self.assigned.get(name)
            if values is None or not values or name in seen:
                return False  # a parameter, or bound some other way
            return all(self._other(v, seen | {name}) for v in values)
        return False

    def _assign(self, value: ast.expr | None) -> list[ast.stmt]:
        sentinel = self.sentinel
        if sentinel is not None:
            if self._is_sentinel(value):
                return ast.parse("\n".join(sentinel.exit)).body
            if not self._returns_other(value):
                check = ast.If(
                    test=ast.Compare(
                        left=ast.Name(id=self.result, ctx=ast.Load()),
                        ops=[ast.Is()],
                        comparators=[ast.Name(id=sentinel.name, ctx=ast.Load())],
                    ),
                    body=ast.parse("\n".join(sentinel.exit)).body,
                    orelse=[],
                )
                return [*self._plain_assign(value), check]
        return self._plain_assign(value)

    def _plain_assign(self, value: ast.expr | None) -> list[ast.stmt]:
        if not self.returns_value:
            if value is None or _is_none(value):
                return []
            return [ast.Expr(value=value)]  # unreachable: returns_value would be set
        return [
            ast.Assign(
                targets=[ast.Name(id=self.result, ctx=ast.Store())],
                value=value if value is not None else ast.Constant(value=None),
            )
        ]

    def _loop(self, body: list[ast.stmt]) -> ast.stmt:
        """``while True:`` around the body, each ``return`` an assignment and ``break``."""

        class Returns(ast.NodeTransformer):
            def __init__(self, assign: _Assign) -> None:
                self.assign = assign

            def visit_Return(self, node: ast.Return) -> list[ast.stmt]:
                return [*self.assign(node.value), ast.Break()]

        ends = bool(body) and isinstance(body[-1], ast.Return)
        rewritten = [Returns(self._plain_assign).visit(statement) for statement in body]
        flat: list[ast.stmt] = []
        for statement in rewritten:
            flat.extend(statement if isinstance(statement, list) else [statement])
        if not ends:
            flat += [*self._plain_assign(None), ast.Break()]
        return ast.While(test=ast.Constant(value=True), body=flat, orelse=[])


def _ordered(test: ast.expr) -> frozenset[str]:
    """The name in ``test`` when it is ``name < number`` (or ``<=``, ``>``, ``>=``, either way
    round): had the name held the sentinel, which has no order, the test would have raised."""
    if (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], (ast.Lt, ast.LtE, ast.Gt, ast.GtE))
    ):
        sides = (test.left, test.comparators[0])
        for name, number in (sides, sides[::-1]):
            if (
                isinstance(name, ast.Name)
                and isinstance(number, ast.Constant)
                and type(number.value) in (int, float)
            ):
                return frozenset({name.id})
    return frozenset()


def _is_none(value: ast.expr | None) -> bool:
    return value is None or (isinstance(value, ast.Constant) and value.value is None)


def _has_return(statement: ast.stmt) -> bool:
    return any(isinstance(node, ast.Return) for node in ast.walk(statement))


def _fold(statements: list[ast.stmt], assign: _Assign) -> list[ast.stmt] | None:
    """``statements`` (the rest of the body) without ``return``: an ``if`` that returns gets the
    statements after it copied into both branches; ``None`` when a return sits elsewhere."""
    out: list[ast.stmt] = []
    for i, statement in enumerate(statements):
        if isinstance(statement, ast.Return):
            return out + assign(statement.value)
        if not _has_return(statement):
            out.append(statement)
            continue
        if not isinstance(statement, ast.If):
            return None
        rest = statements[i + 1 :]
        body = _fold([*statement.body, *rest], assign)
        orelse = _fold([*statement.orelse, *rest], assign)
        if body is None or orelse is None:
            return None
        out.append(ast.If(test=statement.test, body=body or [ast.Pass()], orelse=orelse))
        return out
    return out + assign(None)


# -- fixed configuration -------------------------------------------------------------------------


class FixedAttributes:
    """Mixin for a layer whose attributes named in :attr:`fixed_attributes` never change once
    written: each may be assigned once (in ``__init__``) and never again, nor deleted.

    An inlined hook body reads such an attribute of ``self`` once, when the pipeline is built
    (:func:`fold_fixed`), as it does the fields of a frozen dataclass layer. The guard costs an
    attribute assignment a Python call, so it suits a layer that assigns its attributes when it
    is built (its hot path only reads them). Like a frozen dataclass, it is bypassed only by
    ``object.__setattr__``; a run built before such a write keeps the value it read.
    """

    __slots__ = ()

    fixed_attributes: ClassVar[frozenset[str]] = frozenset()
    """The attributes written once; a subclass that declares its own set names all of them."""

    if not TYPE_CHECKING:  # (a declared __setattr__ would let the type checker accept any name)

        def __setattr__(self, name: str, value: Any) -> None:
            if name in type(self).fixed_attributes and _is_set(self, name):
                raise AttributeError(
                    f"{type(self).__name__}.{name} is fixed once the layer is built"
                )
            object.__setattr__(self, name, value)

        def __delattr__(self, name: str) -> None:
            if name in type(self).fixed_attributes:
                raise AttributeError(
                    f"{type(self).__name__}.{name} is fixed once the layer is built"
                )
            object.__delattr__(self, name)


def _is_set(instance: object, name: str) -> bool:
    try:
        object.__getattribute__(instance, name)
    except AttributeError:
        return False
    return True


def _owner(kind: type, name: str) -> type | None:
    """The class in ``kind``'s MRO whose own namespace holds ``name``."""
    for klass in kind.__mro__:
        if name in vars(klass):
            return klass
    return None


def _fixed_names(kind: type) -> frozenset[str]:
    """The attributes of ``kind``'s instances that nothing but ``object.__setattr__`` can change
    once written: the fields of a frozen dataclass, or the names a :class:`FixedAttributes`
    class declares (and only while the class keeps that class's ``__setattr__``,
    ``__delattr__`` and the plain ``__getattribute__``)."""
    if _owner(kind, "__getattribute__") is not object:
        return frozenset()
    setter = _owner(kind, "__setattr__")
    if setter is None or setter is not _owner(kind, "__delattr__"):
        return frozenset()
    params = vars(setter).get("__dataclass_params__")
    if params is not None and params.frozen:
        return frozenset(f.name for f in dataclasses.fields(setter))
    if setter is FixedAttributes:
        declared: object = getattr(kind, "fixed_attributes", None)
        return declared if isinstance(declared, frozenset) else frozenset()
    return frozenset()


_MISSING: Any = object()


def _fixed_value(layer: object, name: str) -> Any:
    """What ``layer.name`` reads whenever a hook runs, read now (``_MISSING``: not fixed).

    The read must find the instance's own value: a slot, or the instance ``__dict__`` when no
    data descriptor (a property) on the class comes first."""
    kind = type(layer)
    if name not in _fixed_names(kind):
        return _MISSING
    owner = _owner(kind, name)
    static = vars(owner)[name] if owner is not None else _MISSING
    if not isinstance(static, types.MemberDescriptorType):
        if hasattr(type(static), "__set__") or hasattr(type(static), "__delete__"):
            return _MISSING  # a property or other data descriptor: not a stored value
        try:
            instance_dict = object.__getattribute__(layer, "__dict__")
        except AttributeError:
            return _MISSING
        if name not in instance_dict:
            return _MISSING  # the class's value, which the class may rebind
    try:
        return object.__getattribute__(layer, name)
    except AttributeError:
        return _MISSING  # never written: the run's read raises, as the call's would


_LITERAL_TYPES = (type(None), bool, int, float, str)

_ORDERS: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


def _is_literal(node: ast.expr) -> bool:
    """A constant whose truth, equality and order are known now and cost nothing to compute."""
    return isinstance(node, ast.Constant) and type(node.value) in _LITERAL_TYPES


def _writable(value: Any) -> bool:
    """``value`` can be written as a literal (a negative number or ``-0.0`` cannot: the
    unparser writes ``-1 ** 2`` for ``(-1) ** 2``; ``inf`` and ``nan`` have no literal)."""
    if type(value) in (type(None), bool, str):
        return True
    if type(value) is int:
        return bool(value >= 0)
    if type(value) is float:
        return math.isfinite(value) and math.copysign(1.0, value) > 0
    return False


def fold_fixed(layer: object, inlined: Inlined, prefix: str) -> Inlined:
    """``inlined`` (a hook body of ``layer``) with the layer's fixed configuration folded in.

    Each ``self.NAME`` read of a fixed attribute (see :func:`_fixed_names`) becomes its value,
    read now: ``None``, a bool, a non-negative number or a string as a literal, anything else
    as a name bound to the very object. Then constant tests are decided: ``not C``,
    ``C is None``, ``C is not None``, comparisons of two literals, ``and`` / ``or`` with
    constant operands (keeping Python's short circuit and values), ``if`` / ``elif`` and
    ``x if C else y``, and a local assigned a literal once and read only after it is replaced
    by the literal. Dead branches are dropped.

    Args:
        layer: The layer the hook belongs to.
        inlined: Its translated body (``self`` is the name ``prefix + "self"``).
        prefix: The hook's prefix in the run.

    Returns:
        The folded body, or ``inlined`` itself when nothing is fixed.
    """
    source = "\n".join(inlined.lines)
    tree = ast.parse(source)
    folder = _Folder(layer, prefix, tree, inlined.namespace)
    body = folder.run(tree.body)
    if not folder.namespace and not folder.changed:
        return inlined
    module = ast.fix_missing_locations(ast.Module(body=body or [ast.Pass()], type_ignores=[]))
    return dataclasses.replace(
        inlined,
        lines=tuple(ast.unparse(module).splitlines()),
        namespace={**inlined.namespace, **folder.namespace},
    )


class _Folder:
    """One hook body of one layer, its fixed reads replaced and its constant tests decided."""

    def __init__(
        self, layer: object, prefix: str, tree: ast.Module, namespace: dict[str, Any]
    ) -> None:
        self.layer = layer
        self.prefix = prefix
        self.self_name = prefix + "self"
        self.used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | set(namespace)
        self.namespace: dict[str, Any] = {}
        """Names bound to fixed values that are not written as literals."""
        self.bound: dict[str, str] = {}
        """Attribute -> the name bound to its value."""
        self.known: dict[str, Any] = {}
        """Names (bound values, and locals assigned one once) whose value is known now."""
        self.literals: dict[str, ast.Constant] = {}
        """Locals assigned a literal once and read only after: replaced by the literal."""
        self.changed = False

    def run(self, body: list[ast.stmt]) -> list[ast.stmt]:
        body = self._block(body)
        for _ in range(8):  # each round may decide tests that make more locals known
            if not self._propagate(body):
                break
            body = self._block(body)
        return body

    # -- fixed reads ----------------------------------------------------------------------------

    def _fixed_read(self, node: ast.expr) -> Any:
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Load)
            and isinstance(node.value, ast.Name)
            and node.value.id == self.self_name
        ):
            return _fixed_value(self.layer, node.attr)
        return _MISSING

    def _bind(self, attr: str, value: Any) -> ast.Name:
        name = self.bound.get(attr)
        if name is None:
            name = f"{self.prefix}self_{attr}"
            while name in self.used:
                name += "_"
            self.used.add(name)
            self.bound[attr] = name
            self.namespace[name] = value
            self.known[name] = value
        return ast.Name(id=name, ctx=ast.Load())

    def _replace(self, node: ast.Attribute, value: Any, literal: bool) -> ast.expr:
        self.changed = True
        if literal and _writable(value):
            return ast.Constant(value=value)
        return self._bind(node.attr, value)

    # -- expressions ------------------------------------------------------------------------------

    def _expr(self, node: ast.expr, test: bool = False) -> ast.expr:
        """``node`` folded; ``test``: only its truth is used, tested once (an ``if`` test)."""
        value = self._fixed_read(node)
        if value is not _MISSING:
            assert isinstance(node, ast.Attribute)
            return self._replace(node, value, literal=True)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            constant = self.literals.get(node.id)
            if constant is not None:
                self.changed = True
                return ast.Constant(value=constant.value)
            return node
        if isinstance(node, ast.BoolOp):
            values = [self._expr(v, test) for v in node.values]
            return self._bool_op(node, values, test)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            # ``not`` tests its operand once; in a test, so does the jump on its result.
            operand = self._expr(node.operand, test)
            if _is_literal(operand):
                self.changed = True
                assert isinstance(operand, ast.Constant)
                return ast.Constant(value=not operand.value)
            node.operand = operand
            return node
        if isinstance(node, ast.IfExp):
            condition = self._expr(node.test, True)
            if _is_literal(condition):
                self.changed = True
                assert isinstance(condition, ast.Constant)
                return self._expr(node.body if condition.value else node.orelse, test)
            node.test = condition
            node.body = self._expr(node.body, test)
            node.orelse = self._expr(node.orelse, test)
            return node
        if isinstance(node, ast.Compare):
            return self._compare(node)
        self._children(node)
        return node

    def _children(self, node: ast.AST) -> None:
        """Fold the expressions directly below ``node`` (any kind of node)."""
        for name, value in ast.iter_fields(node):
            if isinstance(value, ast.expr):
                setattr(node, name, self._expr(value))
            elif isinstance(value, list):
                setattr(
                    node,
                    name,
                    [self._expr(v) if isinstance(v, ast.expr) else v for v in value],
                )
                for item in value:
                    if isinstance(item, ast.keyword):
                        item.value = self._expr(item.value)
            elif isinstance(value, ast.keyword):
                value.value = self._expr(value.value)

    def _bool_op(self, node: ast.BoolOp, values: list[ast.expr], test: bool) -> ast.expr:
        """``a or b or ...`` (``and`` alike) with constant operands decided: a constant that
        decides the result ends it (later operands never run); one that does not is skipped,
        unless it is the last (it is then the value), or in a test."""
        decides = isinstance(node.op, ast.Or)  # the truth that ends the chain
        out: list[ast.expr] = []
        for i, value in enumerate(values):
            if not _is_literal(value):
                out.append(value)
                continue
            assert isinstance(value, ast.Constant)
            if bool(value.value) is decides:
                out.append(value)
                break
            if i == len(values) - 1:
                out.append(value)
        if (
            test and len(out) > 1 and _is_literal(out[-1]) and bool(out[-1].value) is not decides  # type: ignore[attr-defined]
        ):
            out.pop()  # a test reads only the truth, which the operands before decide
        if len(out) != len(node.values):
            self.changed = True
        if len(out) == 1:
            return out[0]
        node.values = out
        return node

    def _compare(self, node: ast.Compare) -> ast.expr:
        """``C is None`` / ``C is not None`` for a known ``C``, and ``==``, ``!=`` or an order
        between two literals, decided; other comparisons folded inside."""
        if len(node.ops) != 1:
            self._children(node)
            return node
        op = node.ops[0]
        identity = isinstance(op, (ast.Is, ast.IsNot))
        sides = []
        for side in (node.left, node.comparators[0]):
            value = self._fixed_read(side)
            if value is not _MISSING:
                assert isinstance(side, ast.Attribute)
                # Identity needs the very object, and only None and the bools are singletons.
                literal = not identity or value is None or type(value) is bool
                sides.append(self._replace(side, value, literal))
            else:
                sides.append(self._expr(side))
        left, right = sides
        node.left, node.comparators = left, [right]
        decided = self._decide(op, left, right)
        if decided is _MISSING:
            return node
        self.changed = True
        return ast.Constant(value=decided)

    def _known(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.known:
            return self.known[node.id]
        return _MISSING

    def _decide(self, op: ast.cmpop, left: ast.expr, right: ast.expr) -> Any:
        if isinstance(op, (ast.Is, ast.IsNot)):
            first, second = self._known(left), self._known(right)
            if first is _MISSING or second is _MISSING:
                return _MISSING
            if not (
                first is None or second is None or (type(first) is bool and type(second) is bool)
            ):
                return _MISSING  # two objects: only the singletons None and the bools are sure
            return (first is second) is isinstance(op, ast.Is)
        if not (_is_literal(left) and _is_literal(right)):
            return _MISSING
        assert isinstance(left, ast.Constant)
        assert isinstance(right, ast.Constant)
        a: Any = left.value
        b: Any = right.value
        if isinstance(op, ast.Eq):
            return a == b
        if isinstance(op, ast.NotEq):
            return a != b
        numbers = (bool, int, float)
        if not (
            (isinstance(a, numbers) and isinstance(b, numbers))
            or (isinstance(a, str) and isinstance(b, str))
        ):
            return _MISSING  # ``None < 1`` raises: leave it to the run
        order = _ORDERS.get(type(op))
        return _MISSING if order is None else order(a, b)

    # -- statements -----------------------------------------------------------------------------

    def _block(self, statements: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for statement in statements:
            out.extend(self._stmt(statement))
        return out

    def _stmt(self, node: ast.stmt) -> list[ast.stmt]:
        if isinstance(node, ast.If):
            condition = self._expr(node.test, True)
            if _is_literal(condition):
                self.changed = True
                assert isinstance(condition, ast.Constant)
                return self._block(node.body if condition.value else node.orelse)
            node.test = condition
            node.body = self._block(node.body) or [ast.Pass()]
            node.orelse = self._block(node.orelse)
            return [node]
        if isinstance(node, ast.Assign) and _is_name_target(node):
            target = node.targets[0]
            assert isinstance(target, ast.Name)
            if target.id in self.literals:
                self.changed = True
                return []  # a literal every later read now writes itself
        if isinstance(node, ast.Expr):
            value = self._expr(node.value)
            if isinstance(value, ast.Constant):
                self.changed = True
                return []  # a constant alone does nothing
            node.value = value
            return [node]
        if isinstance(node, ast.Try):
            node.body = self._block(node.body) or [ast.Pass()]
            for handler in node.handlers:
                if handler.type is not None:
                    handler.type = self._expr(handler.type)
                handler.body = self._block(handler.body) or [ast.Pass()]
            node.orelse = self._block(node.orelse)
            node.finalbody = self._block(node.finalbody)
            return [node]
        if isinstance(node, ast.While):
            node.test = self._expr(node.test, True)
            node.body = self._block(node.body) or [ast.Pass()]
            node.orelse = self._block(node.orelse)
            return [node]
        self._children(node)
        return [node]

    # -- locals ---------------------------------------------------------------------------------

    def _propagate(self, body: list[ast.stmt]) -> bool:
        """Learn the locals assigned a known value exactly once and read only in the
        statements after that assignment (which it therefore precedes); ``True`` when some
        local is new."""
        stores: dict[str, int] = {}
        loads: dict[str, int] = {}
        for statement in body:
            for node in ast.walk(statement):
                if isinstance(node, ast.Name):
                    counts = loads if isinstance(node.ctx, ast.Load) else stores
                    counts[node.id] = counts.get(node.id, 0) + 1
                elif isinstance(node, ast.ExceptHandler) and node.name is not None:
                    stores[node.name] = stores.get(node.name, 0) + 2
        identities = {
            side.id
            for statement in body
            for node in ast.walk(statement)
            if isinstance(node, ast.Compare)
            and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops)
            for side in (node.left, *node.comparators)
            if isinstance(side, ast.Name)
        }
        learned = False
        for statements in _blocks(body):
            for i, statement in enumerate(statements):
                if not (isinstance(statement, ast.Assign) and _is_name_target(statement)):
                    continue
                target = statement.targets[0]
                assert isinstance(target, ast.Name)
                name = target.id
                if (
                    not name.startswith(self.prefix)
                    or name in self.known
                    or name in self.literals
                    or stores.get(name) != 1
                ):
                    continue
                value = self._known(statement.value)
                if value is _MISSING:
                    continue
                after = sum(
                    1
                    for later in statements[i + 1 :]
                    for node in ast.walk(later)
                    if isinstance(node, ast.Name) and node.id == name
                )
                if after != loads.get(name, 0):
                    continue  # read before it is assigned (or by its own assignment)
                if _is_literal(statement.value) and (
                    value is None or type(value) is bool or name not in identities
                ):
                    # (Identity needs the very object: a number compared with ``is`` stays.)
                    assert isinstance(statement.value, ast.Constant)
                    self.literals[name] = statement.value
                self.known[name] = value
                learned = True
        return learned


def _is_name_target(node: ast.Assign) -> bool:
    return len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)


def _blocks(body: list[ast.stmt]) -> list[list[ast.stmt]]:
    """``body`` and every statement list nested in it."""
    found = [body]
    for statement in body:
        for node in ast.walk(statement):
            for name in ("body", "orelse", "finalbody"):
                block = getattr(node, name, None)
                if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                    found.append(block)
    return found
