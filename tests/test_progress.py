"""Progress bars: live on a terminal; in a log, one line per refresh interval instead of a carriage-return
update per step."""

import io

from m2model.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_gets_a_line_per_interval_not_per_update():
    log = io.StringIO()
    bar = progress_bar(5000, desc="train", stream=log, log_interval=3600)
    for i in range(5000):
        bar.set_postfix(loss=f"{i}", refresh=False)
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 2  # the opening line and the final one
    assert lines[-1].startswith("train: 100%") and "5000/5000" in lines[-1] and "loss=4999" in lines[-1]


def test_terminal_gets_the_live_bar():
    tty = _Terminal()
    bar = progress_bar(50, desc="train", stream=tty, mininterval=0)
    for _ in range(50):
        bar.update(1)
    bar.close()
    assert tty.getvalue().count("\r") > 10  # redrawn in place
