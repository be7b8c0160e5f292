"""Progress of a run over its units: a tqdm bar on a terminal, plain lines otherwise.

Every finished unit prints one line, ``[3/12] sam_seed1: test acc 0.9361, train loss 0.2113,
4.1 ms/step; elapsed 0:42, ETA 1:48``, whatever the display. With a bar (stderr is a terminal, or
``progress=True``; tqdm installed) the bar counts optimizer steps and the lines are written above
it. Without one (a log file, CI, ``progress=False``), a unit running longer than ``interval``
seconds also prints ``  sam_seed1: step 120/440 (27%); elapsed 1:02, ETA 2:51`` every ``interval``
seconds. The ETA is the elapsed time scaled by the steps left over the steps done in this invocation.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional


def clock_text(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_bar(total: int, progress: Optional[bool]):
    """A tqdm bar over ``total`` steps, or None: ``progress`` False, tqdm not installed, or
    ``progress`` None and stderr not a terminal."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)


class Progress:
    """The progress display of ``units`` units of ``steps_per_unit`` steps each (see the module's
    docstring). ``log`` receives the lines; ``clock`` is ``time.monotonic`` (replaceable in tests)."""

    def __init__(self, units: int, steps_per_unit: int, progress: Optional[bool], log: Callable[[str], None] = print,
                 interval: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.units, self.per_unit, self.interval, self.clock = units, steps_per_unit, interval, clock
        self.bar = progress_bar(units * steps_per_unit, progress)
        self.log = self.bar.write if self.bar is not None else log
        self.started = clock()
        self.done_units = self.done_steps = self.unit_steps = 0
        self.unit, self.last_line = "", self.started

    def eta(self) -> str:
        left = self.units * self.per_unit - self.done_steps
        if not self.done_steps:
            return "?"
        return clock_text((self.clock() - self.started) * left / self.done_steps)

    def timing(self) -> str:
        return f"elapsed {clock_text(self.clock() - self.started)}, ETA {self.eta()}"

    def start(self, unit: str) -> None:
        """A unit starts."""
        self.unit, self.unit_steps = unit, 0
        if self.bar is not None:
            self.bar.set_description(unit)

    def step(self, info: dict) -> None:
        """After every optimizer step (``info``: ``train_loss`` and ``test_acc`` at evaluations)."""
        self.done_steps += 1
        self.unit_steps += 1
        if self.bar is not None:
            self.bar.update(1)
            if "test_acc" in info:
                self.bar.set_postfix(loss=f"{info['train_loss']:.3f}", acc=f"{info['test_acc']:.3f}")
        elif self.clock() - self.last_line >= self.interval:
            self.last_line = self.clock()
            self.log(f"  {self.unit}: step {self.unit_steps}/{self.per_unit} "
                     f"({100 * self.unit_steps // max(1, self.per_unit)}%); {self.timing()}")

    def finish(self, unit: str, final: dict) -> None:
        """A unit is done: one line with its final numbers, the units done and the time left."""
        self.done_units += 1
        self.done_steps = self.done_units * self.per_unit  # a unit may take fewer steps than planned
        self.last_line = self.clock()
        self.log(f"[{self.done_units}/{self.units}] {unit}: test acc {final['test_acc']:.4f}, "
                 f"train loss {final['train_loss']:.4f}, {1000 * final['time_per_step_s']:.1f} ms/step; "
                 f"{self.timing()}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
