"""The errors difftrain reports as one line (``difftrain: error: ...``) and a non-zero exit.

Each names what is wrong (config key, shard, sample, checkpoint file, rank and phase); ``cli.main`` prints
the message alone, no traceback. Anything else is a bug and keeps its traceback."""
from __future__ import annotations

import sys


def say(line: str) -> None:
    """Write one message line to stderr in one call, the newline included: every rank of a job shares the
    launcher's stderr, and ``print`` writes the text and its newline apart, so two ranks' lines could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class DifftrainError(RuntimeError):
    """A fault of the run's inputs or of its environment, explained in one line."""

    exit_code = 1
    label = "error: "

    def headline(self) -> str:
        return f"difftrain: {self.label}{self}"
