"""``@resilient``: a policy declared on the handler itself."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .clock import Clock, default_clock
from .errors import ConfigError

if TYPE_CHECKING:
    from .pipeline import Handler
    from .policy import Policy

__all__ = ["policy_of", "resilient"]

H = TypeVar("H", bound=Callable[[dict[str, Any]], Awaitable[None]])

_POLICY_ATTR = "__resilience_policy__"
_WRAPPED_ATTR = "__resilience_handler__"


def resilient(
    policy: Policy | Mapping[str, Any] | None = None,
    *,
    clock: Clock | None = None,
    **sections: Any,
) -> Callable[[H], H]:
    """Wrap ``async def handler(payload)`` with a policy, declaratively.

    ``@resilient(retry={"attempts": 5}, timeout={"attempt": 2})`` builds the policy from
    keyword sections (the TOML layout); ``@resilient(Policy.from_toml("policy.toml"))`` takes a
    ready one. Calling the decorated function runs the whole pipeline around the call; handing
    it to :class:`~resilience.consumer.ResilientConsumer` or ``resilience run`` makes the
    consumer use the policy (and settle messages by its outcome) instead.

    Raises:
        ConfigError: the policy is invalid (at decoration time).
    """
    from .policy import Policy

    if policy is None:
        resolved = Policy.from_dict(sections)
    elif isinstance(policy, Policy):
        if sections:
            raise ConfigError("pass either a Policy or keyword sections to @resilient, not both")
        resolved = policy
    else:
        resolved = Policy.from_dict({**policy, **sections})

    def decorate(handler: H) -> H:
        from .delivery import Delivery

        the_clock = clock or default_clock
        call = resolved.pipeline(clock=the_clock, handler=handler).build(handler)

        @functools.wraps(handler)
        async def wrapper(payload: dict[str, Any]) -> None:
            await call(Delivery(payload, started_at=the_clock.monotonic()))

        setattr(wrapper, _POLICY_ATTR, resolved)
        setattr(wrapper, _WRAPPED_ATTR, handler)
        return wrapper  # type: ignore[return-value]

    return decorate


def policy_of(handler: Handler) -> tuple[Policy | None, Handler]:
    """The policy ``@resilient`` attached to ``handler`` and the undecorated handler."""
    from .policy import Policy

    policy = getattr(handler, _POLICY_ATTR, None)
    if isinstance(policy, Policy):
        return policy, getattr(handler, _WRAPPED_ATTR)
    return None, handler
