"""Progress bars (tqdm) that suit both a terminal and a log file.

On a terminal the bar updates live. When the stream is not a terminal (a log file, a pipe, a CI job),
tqdm's carriage-return updates would pile up as one enormous line; instead the bar is refreshed at most
every ``log_interval`` seconds and each refresh is written as a line of its own, plus a last line when it
closes.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each refresh into one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\x1b[A", "").strip("\r\n")
        text = text.split("\r")[-1].rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total=None, *, desc: str = "", initial: int = 0, unit: str = "it", disable: bool = False,
                 stream=None, log_interval: float = LOG_INTERVAL_S, **kwargs):
    """A tqdm bar on ``stream`` (default stderr): live on a terminal, one line every ``log_interval``
    seconds otherwise. Use ``set_postfix(..., refresh=False)`` so that postfix changes do not add lines."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", lambda: False)()
    if isatty:
        return tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=disable, file=stream,
                    dynamic_ncols=True, **kwargs)
    return tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=disable, file=_Lines(stream),
                mininterval=log_interval, maxinterval=float("inf"), ncols=100, ascii=True, **kwargs)
