"""Progress output of the forgetting benchmark: a tqdm bar per phase on stderr, or plain lines."""

from __future__ import annotations

import sys


class Progress:
    """A tqdm bar per phase (stderr), or nothing under --quiet; ``say`` prints a line either way."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def bar(self, total: int, desc: str):
        if self.quiet:
            return _NoBar()
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            leave=False,
            file=sys.stderr,
            mininterval=0.5,
        )

    def say(self, msg: str) -> None:
        if self.quiet:
            print(msg, flush=True)
        else:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
