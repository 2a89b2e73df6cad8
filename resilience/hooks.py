"""Success-path hooks: how a layer runs without a coroutine frame of its own.

Every layer is a middleware ``async (delivery, call_next)``. A layer may instead (or also)
describe itself by four hooks, and then the pipeline runs it inside one frame shared with its
neighbours:

* ``enter(delivery) -> token``: plain, synchronous work before the rest of the pipeline runs
  (check a flag, register a deadline, open a span). It returns a token that is handed back to
  ``leave`` or ``fail``; or :data:`SLOW_PATH` (before doing anything) when this delivery needs the
  layer's own asynchronous code, ``slow``.
* ``leave(token, delivery)``: plain work after the rest of the pipeline returned. It returns
  ``None``, or (rarely) an awaitable to await before the outer layers leave.
* ``fail(token, delivery, exc, call_next)``: the rest of the pipeline raised ``exc``; a
  coroutine that handles it (returns: the layer's call succeeded; ``call_next`` is there to call
  the rest again) or raises (``exc`` itself, or what it became).
* ``slow(delivery, call_next)``: the layer's whole asynchronous path, for when ``enter`` returned
  :data:`SLOW_PATH`.

:func:`compile_hooks` turns a run of such layers into one ``CallNext``: it calls every ``enter``
outermost first, awaits the handler (or whatever is below the run), and calls every ``leave``
innermost first. Only when something goes wrong does it await the layers' ``fail`` or ``slow``,
innermost first, exactly as nested frames would have seen the exception. A layer written with
:class:`HookLayer` links itself with the same function (a run of one), so the hooks are the
layer's only code: nothing is written twice.

A hook call is a Python frame of its own, several per message. When an ``enter`` or ``leave``
hook is simple (no loops, ``with``, ``await``, nested functions, comprehensions, ...), the run
contains its body instead of the call: the compiler reads the exact function found on the
layer's class from its source, as it builds the pipeline, and pastes a mechanical translation
of it in (``self`` bound to the layer, locals renamed, ``return`` turned into the token).
Module-level names such a body reads (a bound-once constant, function, class or import),
builtins, and the layer's fixed configuration (the fields of a frozen dataclass layer, and
the attributes a :class:`FixedAttributes` layer declares written once: ``self.total`` of a
``Timeout``, ``self.budget`` of a ``Retry``) are **read once, at build time**, and the tests
they decide are decided then (``if self.total:`` keeps only the branch taken); any other
attribute of ``self`` is read at each call. A body reading a name its module rebinds, a hook
overridden on a subclass or replaced on the instance, or anything else the translation does
not recognise stays a call (:mod:`resilience._inline` lists the rules). The hook function remains
the one place its logic is written; ``compile_hooks(..., inline=False)`` (or
``Pipeline.build(handler, inline=False)``) calls every hook, with the same behaviour.

**Where the slow path is taken.** A token is checked against :data:`SLOW_PATH` only where it
may be it: after a called ``enter``; in an inlined body, a ``return SLOW_PATH`` (the name, read
at build time as the sentinel) *is* the slow path's exit, a ``return`` of a value known not to
be the sentinel (a constant, a new tuple / list / dict / set / f-string, ``not x``, an ``is`` /
``in`` test, a local only ever assigned such values, ``self``, a build-time name bound to
something else, or a name an ordering test with a number saw, since the sentinel has no order)
just sets the token, and any other ``return`` (a call's result, an attribute, arithmetic, a
parameter) sets it and checks it right there. The exit sits inside the ``enter``'s ``try``
block; that block's handler lets the slow path's own outcome (an exception coming straight out
of :func:`_slow`, which has been through the outer layers already) go on instead of handing it
to the outer layers a second time. A body the inliner can only write as a ``while True:`` block
assigns every value and the check follows it.

**Hosted runs.** The steps of a compiled run (or of :func:`terminal`, the handler's own call)
can be pasted into another function instead of awaited: :func:`host` compiles a template
containing the line ``await run(delivery)`` with that line replaced by the run's body in a
``while True:`` block, every ``return`` of the run a ``break``. The consumer's worker loop is
such a template (:data:`resilience.consumer._WORKER_LOOP`): a message then awaits only the
handler's coroutine on its success path. The run's code is written once, here, for both uses.
"""

from __future__ import annotations

import ast
import textwrap
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from ._inline import FixedAttributes, Sentinel, inline_hook

if TYPE_CHECKING:
    from .delivery import Delivery
    from .types import CallNext, Handler

__all__ = [
    "SLOW_PATH",
    "FixedAttributes",
    "HookLayer",
    "Hooks",
    "compile_hooks",
    "has_hooks",
    "host",
    "terminal",
]


class _Slow:
    __slots__ = ()

    def __repr__(self) -> str:
        return "SLOW_PATH"


SLOW_PATH: Final[Any] = _Slow()
"""Returned by ``enter`` (having done nothing) to run the layer's ``slow`` path instead."""


class Hooks(Protocol):
    """The four hooks of a layer that takes part in a compiled run (see the module text)."""

    def enter(self, delivery: Delivery) -> Any:
        """Synchronous work on the way in; a token, or :data:`SLOW_PATH`."""
        ...

    def leave(self, token: Any, delivery: Delivery) -> Awaitable[None] | None:
        """Synchronous work after success; ``None`` or an awaitable to finish it."""
        ...

    def fail(
        self, token: Any, delivery: Delivery, exc: BaseException, call_next: CallNext
    ) -> Awaitable[None]:
        """Handle ``exc`` escaping the rest of the pipeline, or raise."""
        ...

    def slow(self, delivery: Delivery, call_next: CallNext) -> Awaitable[None]:
        """The layer's asynchronous path, when ``enter`` returned :data:`SLOW_PATH`."""
        ...


class HookLayer:
    """Base class of a layer written as hooks: it is a middleware too.

    Subclasses implement ``enter`` and whichever of ``leave`` / ``fail`` / ``slow`` they need
    (the defaults do nothing, re-raise, and run the rest of the pipeline). A subclass that
    overrides ``__call__`` or ``link`` is linked as plain middleware instead.
    """

    __slots__ = ()

    def enter(self, delivery: Delivery) -> Any:
        """Synchronous work on the way in; a token, or :data:`SLOW_PATH`.

        Args:
            delivery: The message.

        Returns:
            A token for :meth:`leave` / :meth:`fail`, or :data:`SLOW_PATH`.
        """
        return None

    def leave(self, token: Any, delivery: Delivery) -> Awaitable[None] | None:
        """Synchronous work after the rest of the pipeline returned (nothing by default).

        Args:
            token: What :meth:`enter` returned.
            delivery: The message.

        Returns:
            ``None``, or an awaitable that finishes the work.
        """
        return None

    async def fail(
        self, token: Any, delivery: Delivery, exc: BaseException, call_next: CallNext
    ) -> None:
        """The rest of the pipeline raised ``exc`` (re-raised by default).

        Args:
            token: What :meth:`enter` returned.
            delivery: The message.
            exc: The exception.
            call_next: The rest of the pipeline, to call again.

        Raises:
            BaseException: ``exc``, or what the layer turned it into.
        """
        raise exc

    async def slow(self, delivery: Delivery, call_next: CallNext) -> None:
        """The asynchronous path when :meth:`enter` returned :data:`SLOW_PATH` (by default: just
        the rest of the pipeline).

        Args:
            delivery: The message.
            call_next: The rest of the pipeline.
        """
        await call_next(delivery)

    def link(self, call_next: CallNext) -> CallNext:
        """This layer alone in front of ``call_next``: a compiled run of one.

        Args:
            call_next: The rest of the pipeline.

        Returns:
            ``async (delivery) -> None``.
        """
        return compile_hooks((self,), call_next)

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        """Process ``delivery`` with this layer in front of ``call_next``: the layer's hooks
        around one call, as a compiled run of one does them.

        Args:
            delivery: The message.
            call_next: The rest of the pipeline.
        """
        delivery.now = delivery.clock = None  # not known to be fresh: the layer reads its clock
        token = self.enter(delivery)
        if token is SLOW_PATH:
            await self.slow(delivery, call_next)
            return
        try:
            await call_next(delivery)
        except BaseException as exc:
            error = exc
        else:
            pending = self.leave(token, delivery)
            if pending is not None:
                await pending
            return
        await self.fail(token, delivery, error, call_next)


_BASE_LEAVE = HookLayer.leave
_HOOK_NAMES = ("enter", "leave", "fail", "slow")


def has_hooks(layer: object) -> bool:
    """Whether ``layer`` takes part in compiled runs: it offers the four hooks and, if it is a
    :class:`HookLayer`, does not replace ``__call__`` or ``link``.

    Args:
        layer: A middleware.

    Returns:
        ``True`` when the pipeline may run ``layer`` by its hooks.
    """
    if isinstance(layer, HookLayer):
        kind = type(layer)
        return kind.__call__ is HookLayer.__call__ and kind.link is HookLayer.link
    return all(callable(getattr(layer, name, None)) for name in _HOOK_NAMES)


def compile_hooks(
    layers: Sequence[Hooks],
    below: CallNext,
    handler: Handler | None = None,
    *,
    fresh: bool = False,
    inline: bool = True,
) -> CallNext:
    """One ``CallNext`` running ``layers`` (outermost first) in front of ``below``.

    Args:
        layers: Layers offering the hooks (see :func:`has_hooks`).
        below: What the innermost layer calls (the rest of the pipeline).
        handler: When ``below`` just calls the user's handler with the payload, that handler:
            the success path then awaits it directly.
        fresh: The run is the outermost element of the pipeline, called straight after the
            delivery was made: its ``enter`` hooks may use the delivery's clock reading
            (:attr:`~resilience.delivery.Delivery.now`). Any other run clears that reading
            before its hooks run (something may have waited before calling it).
        inline: Paste the bodies of simple ``enter`` / ``leave`` hooks into the run instead of
            calling them (see :mod:`resilience._inline`); ``False`` calls every hook. The
            behaviour is the same either way.

    Returns:
        ``async (delivery) -> None``; :func:`host` can paste its steps into a loop.
    """
    layers = tuple(layers)
    # runs[i] is the compiled run of layers[i:]: what layers[i - 1] calls on its slow and
    # failure paths (a retry goes through the inner layers' hooks again). runs[n] is ``below``.
    # Only runs[0], when ``fresh``, is entered straight from the consumer; the inner runs are
    # entered again after a failure (a retry, a replay), when the reading is stale.
    runs: list[CallNext] = [below]
    for i in range(len(layers) - 1, -1, -1):
        runs.insert(0, _run(layers[i:], tuple(runs), handler, fresh and i == 0, inline))
    return runs[0]


def terminal(handler: Handler) -> CallNext:
    """The end of every pipeline: ``handler(delivery.payload)``, as a plain function returning
    the handler's awaitable (no coroutine frame of its own); :func:`host` pastes it as that
    one await.

    Args:
        handler: The user's handler.

    Returns:
        ``(delivery) -> Awaitable[None]``.
    """

    def call(delivery: Delivery) -> Awaitable[None]:
        return handler(delivery.payload)

    _STEPS[call] = _Steps(None, {"handler": handler})
    return call


_Exit = Callable[[str | None, str | None], list[str]]
"""How the steps leave the run: ``exit(awaited, holds)`` are the statements that await
``awaited`` (``None``: nothing) and end the run; ``holds`` names a local holding a failure."""


def _returning(awaited: str | None, holds: str | None = None) -> list[str]:
    """Exits of a run of its own: ``return``."""
    return [f"return await {awaited}" if awaited is not None else "return None"]


def _breaking(awaited: str | None, holds: str | None = None) -> list[str]:
    """Exits of steps pasted into a host: ``break`` out of the ``while True:`` block around
    them. The host's frame outlives the message: a local holding a failure is let go of."""
    if awaited is None:
        return ["break"]
    if holds is None:
        return [f"await {awaited}", "break"]
    return ["try:", f"    await {awaited}", "finally:", f"    {holds} = None", "break"]


class _Steps:
    """What a run does, as statements for :func:`_run` (a coroutine function of its own) or
    :func:`host` (pasted into another function's loop): the run's body written for a given
    way of leaving it (see :data:`_Exit`)."""

    __slots__ = ("namespace", "write")

    def __init__(self, write: Callable[[_Exit], list[str]] | None, namespace: dict[str, Any]):
        self.write = write
        """The run's statements for an exit style; ``None``: the run is ``terminal``."""
        self.namespace = namespace
        """The names the statements read."""

    def lines(self, exit: _Exit) -> list[str]:
        if self.write is None:
            return ["await handler(delivery.payload)"]
        return self.write(exit)


_STEPS: weakref.WeakKeyDictionary[Callable[..., Any], _Steps] = weakref.WeakKeyDictionary()
"""The steps of each compiled run and terminal, by the function that runs them."""


def _run(
    hooks: tuple[Hooks, ...],
    below: tuple[CallNext, ...],
    handler: Handler | None,
    fresh: bool,
    inline: bool,
) -> CallNext:
    """The coroutine function for one run: straight-line code calling each hook in turn.

    Like the ``__init__`` that :mod:`dataclasses` writes, the function's source is generated
    for the run's length (no loop, no token list on the success path) and compiled once, when
    the pipeline is built. ``below[k]`` is what ``hooks[k]`` calls: the run of
    ``hooks[k + 1:]``, or the continuation."""
    namespace: dict[str, Any] = {
        "SLOW_PATH": SLOW_PATH,
        "hooks": hooks,
        "below": below,
        "handler": handler,
        "inner": below[-1],
        "slow": _slow,
        "complete": _complete,
        "slowed": _slowed,
    }

    def write(exit: _Exit) -> list[str]:
        return _body(hooks, handler, fresh, inline, exit, namespace)

    steps = _Steps(write, namespace)
    body = steps.lines(_returning)
    source = "\n".join(["async def run(delivery):", *("    " + line for line in body)]) + "\n"
    names = ", ".join(type(h).__name__ for h in hooks)
    scope = dict(namespace)
    exec(compile(source, f"<resilience.hooks run: {names}>", "exec"), scope)
    run: CallNext = scope["run"]
    _STEPS[run] = steps
    return run


def _body(
    hooks: tuple[Hooks, ...],
    handler: Handler | None,
    fresh: bool,
    inline: bool,
    exit: _Exit,
    namespace: dict[str, Any],
) -> list[str]:
    """The statements of a run (see :func:`_run`), leaving it by ``exit``; the names they read
    that the generated code binds (hooks, inlined bodies' names) are added to ``namespace``.

    The success path is straight-line: each ``enter`` (its body, or a call), the handler, each
    ``leave``, innermost first. A token that may be :data:`SLOW_PATH` is checked right where it
    is made (see :func:`_enter`); the slow path's exit sits inside the ``enter``'s ``try`` block,
    whose handler lets the slow path's outcome through (:func:`_slowed`)."""
    n = len(hooks)
    # Each layer's token: ``t{k}``, or ``None`` when its enter returns nothing else.
    tokens: list[str] = []

    def entered(k: int) -> str:
        return "[" + ", ".join(tokens[:k]) + "]"

    # One try block per hook (free in CPython 3.11 until something raises): an exception is
    # handed to exactly the layers outside the hook that raised it.
    lines: list[str] = []
    if not fresh:
        lines.append("delivery.now = delivery.clock = None  # the reading may be stale here")
    for k, hook in enumerate(hooks):
        slow_exit = exit(f"slow(hooks, below, {entered(k)}, {k}, delivery)", None)
        statements, token_set, exits = _enter(hook, k, inline, slow_exit, namespace)
        tokens.append(f"t{k}" if token_set else "None")
        lines.append("try:")
        lines += ["    " + line for line in statements]
        lines.append("except BaseException as exc:  # an enter hook raised: it escapes that layer")
        if exits:
            lines += [
                "    if slowed(exc):  # the slow path's outcome: the outer layers have seen it",
                "        raise",
            ]
        lines += [
            "    " + line
            for line in exit(f"complete(hooks, below, {entered(k)}, {k}, delivery, exc)", None)
        ]
    call = "handler(delivery.payload)" if handler is not None else "inner(delivery)"
    lines += [
        "try:",
        f"    await {call}",
        "except BaseException as exc:",
        "    error = exc",
        "else:",
    ]
    for k in range(n - 1, -1, -1):
        if getattr(type(hooks[k]), "leave", None) is _BASE_LEAVE:
            continue
        body = (
            inline_hook(hooks[k], "leave", (tokens[k], "delivery"), "pending", f"_{k}l_")
            if inline
            else None
        )
        lines.append("    try:")
        if body is None:
            namespace[f"l{k}"] = hooks[k].leave
            lines.append(f"        pending = l{k}({tokens[k]}, delivery)")
        else:
            namespace.update(body.namespace)
            lines += ["        " + line for line in body.lines]
        if body is None or body.returns_value:
            lines += [
                "        if pending is not None:",
                "            await pending",
            ]
        lines.append(
            "    except BaseException as exc:  # escapes this layer: the outer ones see it"
        )
        lines += [
            "        " + line
            for line in exit(f"complete(hooks, below, {entered(k)}, {k}, delivery, exc)", None)
        ]
    lines += ["    " + line for line in exit(None, None)]
    lines += [
        "# Outside the except block, as nested frames would be: a retry runs with no exception",
        "# being handled, so the handler's own errors do not chain onto later ones.",
        *exit(f"complete(hooks, below, {entered(n)}, {n}, delivery, error)", "error"),
    ]
    return lines


def _enter(
    hook: Hooks, k: int, inline: bool, slow_exit: list[str], namespace: dict[str, Any]
) -> tuple[list[str], bool, bool]:
    """The statements of layer ``k``'s ``enter``, whether they set its token ``t{k}`` and
    whether they contain the slow path's exit.

    The slow path is taken right where the token may be :data:`SLOW_PATH`: after a call of
    the hook, and, in an inlined body (see :mod:`resilience._inline`), at each ``return`` of the
    name ``SLOW_PATH`` (no check: the exit itself) and after each ``return`` whose value might
    be it; a return of a value known not to be it (a constant, ...) sets the token, no check."""
    check = [f"if t{k} is SLOW_PATH:", *("    " + line for line in slow_exit)]
    body = None
    if inline:
        sentinel = Sentinel(SLOW_PATH, "SLOW_PATH", tuple(slow_exit))
        body = inline_hook(hook, "enter", ("delivery",), f"t{k}", f"_{k}e_", sentinel)
    if body is None:
        namespace[f"e{k}"] = hook.enter
        return [f"t{k} = e{k}(delivery)", *check], True, True
    namespace.update(body.namespace)
    lines = list(body.lines)
    if body.unchecked:
        lines += check
    return lines, body.returns_value, body.exits or body.unchecked


def host(
    template: str,
    call: CallNext,
    namespace: dict[str, Any],
    filename: str,
    marks: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Compile ``template`` with the steps of ``call`` in place of its ``await run(delivery)``.

    ``template`` is the source of a function (a consumer's worker loop, say) containing the
    statement ``await run(delivery)`` on a line of its own, exactly once. When ``call`` is a
    compiled run (:func:`compile_hooks`), that line becomes the run's body in a ``while True:``
    block, each way out of the run a ``break`` (the run's ``return await x``: ``await x``, then
    ``break``), so the run takes no coroutine frame of its own and an exception leaves the
    block exactly as it left the awaited call; when ``call`` is a :func:`terminal`, the line
    awaits the handler itself; anything else (plain middleware) is awaited as it is.

    The steps' names (the run's locals and namespace, see :func:`_run`) must not be used by
    the template, except ``delivery``: a clash raises ``ValueError``.

    Args:
        template: The function's source.
        call: What the template awaits (a pipeline from
            :meth:`~resilience.pipeline.Pipeline.build`).
        namespace: The names the template reads.
        filename: Where the function says it comes from (tracebacks, profiles).
        marks: Other lines to replace first: each line of the template whose first word is a
            key (``GATES  # ...``) becomes that key's statements, at its indentation
            (``pass`` when there are none).

    Returns:
        The namespace after running the compiled template (the function is in it).

    Raises:
        ValueError: the template has not exactly one such line (or one line per mark), or
            its names clash.
    """
    lines = template.splitlines()
    for mark, statements in (marks or {}).items():
        site, indent = _site(lines, mark, first_word=True)
        lines[site : site + 1] = [indent + line for line in statements] or [indent + "pass"]
    site, indent = _site(lines, _PLACEHOLDER)
    try:
        steps = _STEPS.get(call)
    except TypeError:  # not weakly referable: no compiled run
        steps = None
    names: dict[str, Any]
    if steps is None:
        pasted, names = [_PLACEHOLDER], {"run": call}
    elif steps.write is None:
        pasted, names = steps.lines(_breaking), steps.namespace
    else:
        pasted = [
            "while True:  # the pipeline's outermost run: each way out of it is a break",
            *("    " + line for line in steps.lines(_breaking)),
        ]
        names = steps.namespace
    ours = _names("\n".join(pasted))
    theirs = _names("\n".join([*lines[:site], indent + "pass", *lines[site + 1 :]]))
    clash = (ours[0] & (theirs[0] | theirs[1])) | (theirs[0] & ours[1])
    clash |= (theirs[1] & names.keys()) | (ours[1] & namespace.keys())
    clash -= {"delivery"}
    if clash:
        raise ValueError(f"the template uses the run's names {sorted(clash)}")
    source = "\n".join([*lines[:site], *(indent + line for line in pasted), *lines[site + 1 :]])
    scope = {**namespace, **names}
    exec(compile(source + "\n", filename, "exec"), scope)
    return scope


_PLACEHOLDER = "await run(delivery)"


def _site(lines: list[str], what: str, *, first_word: bool = False) -> tuple[int, str]:
    """The index and indentation of the one line of ``lines`` that is ``what`` (or, with
    ``first_word``, starts with the word ``what``)."""
    sites = [
        i
        for i, line in enumerate(lines)
        if (line.split()[:1] == [what] if first_word else line.strip() == what)
    ]
    if len(sites) != 1:
        raise ValueError(f"the template must contain {what!r} once, on its own line")
    line = lines[sites[0]]
    return sites[0], line[: len(line) - len(line.lstrip())]


def _names(source: str) -> tuple[set[str], set[str]]:
    """The names ``source`` binds (variables, parameters, caught exceptions) and reads."""
    tree = ast.parse(textwrap.dedent(source))
    bound: set[str] = set()
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name is not None:
            bound.add(node.name)
    return bound, read - bound


def _slowed(exc: BaseException) -> bool:
    """Whether ``exc`` came straight out of :func:`_slow` into the frame handling it: the
    outcome of a slow path, which has been through the outer layers already."""
    tb = exc.__traceback__
    tb = tb.tb_next if tb is not None else None
    return tb is not None and tb.tb_frame.f_code is _SLOW_CODE


async def _slow(
    hooks: tuple[Hooks, ...],
    below: tuple[CallNext, ...],
    tokens: list[Any],
    k: int,
    delivery: Delivery,
) -> None:
    """Layer ``k`` declined the fast path: its ``slow`` path, then the outer layers' hooks."""
    try:
        await hooks[k].slow(delivery, below[k])
    except BaseException as exc:
        return await _complete(hooks, below, tokens, k, delivery, exc)
    return await _complete(hooks, below, tokens, k, delivery, None)


_SLOW_CODE = _slow.__code__


async def _complete(
    hooks: tuple[Hooks, ...],
    below: tuple[CallNext, ...],
    tokens: list[Any],
    k: int,
    delivery: Delivery,
    error: BaseException | None,
) -> None:
    """Finish layers ``k - 1`` down to 0 (innermost first) after the call below layer ``k - 1``
    ended with ``error`` (``None``: it returned): each layer's ``leave`` or ``fail``, exactly as
    each would see the outcome of its own ``call_next``."""
    while k:
        k -= 1
        try:
            if error is None:
                pending = hooks[k].leave(tokens[k], delivery)
                if pending is not None:
                    await pending
            else:
                failed, error = error, None
                await hooks[k].fail(tokens[k], delivery, failed, below[k])
        except BaseException as exc:
            error = exc
    if error is not None:
        raise error
