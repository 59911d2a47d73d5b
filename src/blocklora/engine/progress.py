"""Progress for a terminal or for a log: tqdm's bar when stderr is a terminal, else one log line every N units.

    progress(iterable=None, total=N, desc="train", unit="step", every=10, ...) -> a tqdm bar or a LineProgress

A redirected stderr (a SLURM log, `2> train.err`, a sweep's cell log, a pipe) would otherwise fill with tqdm's
carriage-return frames and say nothing readable for minutes; open_clip and timm log one line every N steps instead
(open_clip's --log-every-n-steps, timm's --log-interval). LineProgress does that through the "blocklora" logger, so
the lines also reach a run's train.log: "train: 50/200 steps (25%), loss=1.23, acc=50.0, 0.21 s/step, eta 32 s".
BLOCKLORA_PROGRESS=bar|lines forces one form (a notebook's stderr is no terminal but shows bars well).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

log = logging.getLogger("blocklora")


def use_bars(stream: TextIO | None = None) -> bool:
    """Whether progress is shown as tqdm bars: BLOCKLORA_PROGRESS if set, else whether `stream` (stderr) is a tty."""
    forced = os.environ.get("BLOCKLORA_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines"):
        return forced == "bar"
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class LineProgress:
    """tqdm's interface as far as blocklora uses it (update, set_postfix, write, close, iteration, a context
    manager), logging a line every `every` units and at the end instead of drawing a bar."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, disable: bool = False, every: int | None = None) -> None:
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start = initial
        # default: about ten lines over the whole pass
        self.every = max(1, every if every else (self.total or 10) // 10)
        self.postfix: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def write(self, text: str, file: TextIO | None = None) -> None:
        print(text, file=file or sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if not self.disable and (self.n // self.every > before // self.every or self.n == self.total):
            self._line()

    def close(self) -> None:
        self.closed = True

    def _line(self) -> None:
        done = self.n - self.start
        per = (time.perf_counter() - self.t0) / done if done else 0.0
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        eta = f", eta {per * (self.total - self.n):.0f} s" if self.total and self.n < self.total else ""
        units = self.unit + ("es" if self.unit.endswith(("ch", "sh", "s", "x")) else "s")
        log.info("%s: %d%s %s%s%s, %.3g s/%s%s", self.desc, self.n, of, units, pct, extra, per, self.unit, eta)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, every: int | None = None, leave: bool = True) -> Any:
    """A tqdm bar on a terminal, else a LineProgress logging every `every` units (default: a tenth of the total)."""
    if use_bars():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave,
                    dynamic_ncols=True, file=sys.stderr)
    return LineProgress(iterable, total, desc, unit, initial, disable, every)
