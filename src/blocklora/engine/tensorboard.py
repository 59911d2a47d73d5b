"""TensorBoard scalars of a run (train.log=tensorboard), written beside metrics.jsonl into RUN/tensorboard/.

    train/loss, train/lr, train/step_time_s, train/batch_accuracy   every step (metrics.jsonl's fields)
    eval/zero_shot_top1 (step 0), eval/top1 (last step), eval/<name>_top1 (base-to-new, cross-dataset)

tensorboard is an optional dependency (the `tensorboard` extra); `check_available` names the fix before a run
writes anything. A resumed run purges the events after its checkpoint's step (SummaryWriter's purge_step), as it
truncates metrics.jsonl: the redone steps are not shown twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..ownership import mark

KIND = "tensorboard"  # the ownership marker's kind of RUN/tensorboard/
STEP_SCALARS = {"loss": "train/loss", "lr": "train/lr", "step_s": "train/step_time_s", "acc": "train/batch_accuracy"}


def check_available() -> None:
    """Raise ConfigError (one line, with the fix) when the tensorboard package is not installed."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("--log tensorboard needs the tensorboard package: pip install 'blocklora[tensorboard]' "
                          "(or pip install tensorboard), or drop --log") from None


class TensorBoardLog:
    """Scalars into `directory` (created and marked as blocklora's). `purge_step`: drop events from that step on."""

    def __init__(self, directory: str | os.PathLike, purge_step: int | None = None) -> None:
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        mark(directory, KIND)
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        """One training step's metrics (the dict metrics.jsonl gets): a skipped step's loss (None) is left out."""
        step = int(record["step"])
        for key, tag in STEP_SCALARS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, float(value), step)

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is not None:
            self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class Loggers:
    """metrics.jsonl's writer and, when asked, TensorBoard's, as one `on_step` callable."""

    def __init__(self, *writers: Any) -> None:
        self.writers = [w for w in writers if w is not None]

    def write(self, record: dict[str, Any]) -> None:
        for w in self.writers:
            w.write(record)

    def close(self) -> None:
        for w in self.writers:
            w.close()
