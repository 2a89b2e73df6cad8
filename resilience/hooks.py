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
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from ._inline import FixedAttributes, inline_hook

if TYPE_CHECKING:
    from .delivery import Delivery
    from .types import CallNext, Handler

__all__ = ["SLOW_PATH", "FixedAttributes", "HookLayer", "Hooks", "compile_hooks", "has_hooks"]


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
        delivery.now = None  # not known to be fresh here: the layer reads its clock
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
        ``async (delivery) -> None``.
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
    n = len(hooks)
    namespace: dict[str, Any] = {
        "SLOW_PATH": SLOW_PATH,
        "hooks": hooks,
        "below": below,
        "handler": handler,
        "inner": below[-1],
        "slow": _slow,
        "complete": _complete,
    }

    def entered(k: int) -> str:
        return "[" + ", ".join(f"t{i}" for i in range(k)) + "]"

    # One try block per hook (free in CPython 3.11 until something raises): an exception is
    # handed to exactly the layers outside the hook that raised it.
    lines = ["async def run(delivery):"]
    if not fresh:
        lines.append("    delivery.now = None  # the clock reading may be stale here")
    for k, hook in enumerate(hooks):
        body = inline_hook(hook, "enter", ("delivery",), f"t{k}", f"_{k}e_") if inline else None
        lines.append("    try:")
        if body is None:
            namespace[f"e{k}"] = hook.enter
            lines.append(f"        t{k} = e{k}(delivery)")
        else:
            namespace.update(body.namespace)
            if not body.returns_value:
                lines.append(f"        t{k} = None")
            lines += ["        " + line for line in body.lines]
        lines += [
            "    except BaseException as exc:  # an enter hook raised: it escapes that layer",
            f"        return await complete(hooks, below, {entered(k)}, {k}, delivery, exc)",
        ]
        if body is None or body.returns_value:
            lines += [
                f"    if t{k} is SLOW_PATH:",
                f"        return await slow(hooks, below, {entered(k)}, {k}, delivery)",
            ]
    call = "handler(delivery.payload)" if handler is not None else "inner(delivery)"
    lines += [
        "    try:",
        f"        await {call}",
        "    except BaseException as exc:",
        "        error = exc",
        "    else:",
    ]
    for k in range(n - 1, -1, -1):
        if getattr(type(hooks[k]), "leave", None) is _BASE_LEAVE:
            continue
        body = (
            inline_hook(hooks[k], "leave", (f"t{k}", "delivery"), "pending", f"_{k}l_")
            if inline
            else None
        )
        lines.append("        try:")
        if body is None:
            namespace[f"l{k}"] = hooks[k].leave
            lines.append(f"            pending = l{k}(t{k}, delivery)")
        else:
            namespace.update(body.namespace)
            lines += ["            " + line for line in body.lines]
        if body is None or body.returns_value:
            lines += [
                "            if pending is not None:",
                "                await pending",
            ]
        lines += [
            "        except BaseException as exc:  # escapes this layer: the outer ones see it",
            f"            return await complete(hooks, below, {entered(k)}, {k}, delivery, exc)",
        ]
    lines += [
        "        return None",
        "    # Outside the except block, as nested frames would be: a retry runs with no exception",
        "    # being handled, so the handler's own errors do not chain onto later ones.",
        f"    return await complete(hooks, below, {entered(n)}, {n}, delivery, error)",
    ]
    source = "\n".join(lines) + "\n"
    names = ", ".join(type(h).__name__ for h in hooks)
    exec(compile(source, f"<resilience.hooks run: {names}>", "exec"), namespace)
    run: CallNext = namespace["run"]
    return run


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
