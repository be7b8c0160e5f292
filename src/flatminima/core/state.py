"""A component's own per-parameter state, under its namespace, written only when a step is taken.

Every stateful component (an ascent link's EMA, SSAM's mask, LookSAM's stored direction, the
Fisher EMA of the random noise) reads and writes ``opt.method_state[p]`` through a
:class:`StateSlot` named after it, so its keys are ``"<namespace>.<name>"`` (``"vasso.ema"``,
``"ssam.mask"``) and two components never collide. A write is *staged*: :meth:`StateSlot.write`
returns a commit that the optimizer runs after the base step, only when the step is taken (an
AMP-skipped or aborted step commits nothing), so a step can always be redone from the same state.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor

Commit = Callable[[], None]


class StateSlot:
    """Per-parameter state of one component in ``opt.method_state`` under ``namespace``."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    def __repr__(self) -> str:
        return f"StateSlot({self.namespace!r})"

    def key(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    def read(self, opt, params: Sequence[Tensor], name: str) -> list[Optional[Tensor]]:
        """The committed value of ``name`` for each parameter (None where there is none yet)."""
        key = self.key(name)
        state = opt.method_state
        return [state[p].get(key) if p in state else None for p in params]

    def write(self, opt, params: Sequence[Tensor], name: str, values: Sequence[Tensor]) -> Commit:
        """A commit that makes ``values`` the state ``name`` of ``params`` (run when the step is taken)."""
        key, pairs = self.key(name), list(zip(params, values))

        def commit() -> None:
            for p, v in pairs:
                opt.method_state[p][key] = v

        return commit

    def update(self, opt, params: Sequence[Tensor], name: str,
               fn: Callable[[Optional[Tensor], int], Tensor]) -> Commit:
        """A commit that sets ``name`` of the i-th parameter to ``fn(old, i)`` (``old`` None where
        unset) when the step is taken: an EMA updated in place needs no second copy of its state."""
        key, params = self.key(name), list(params)

        def commit() -> None:
            for i, p in enumerate(params):
                opt.method_state[p][key] = fn(opt.method_state[p].get(key), i)

        return commit
