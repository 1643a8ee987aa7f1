"""`python -m worker` and the `mailgun-sync` command.

Until the command takes the signals over (worker.cli.interruptible), SIGINT or SIGTERM ends the
process at once, with the shell's exit code for it: nothing has started, so there is nothing to
say or undo. A KeyboardInterrupt in the middle of the imports (about half a second) would print a
traceback, and one raised inside a class's generated code makes the interpreter kill itself with
SIGINT at exit whatever caught it. Set when this module loads: the console script imports it
before anything else of the worker.
"""

import os
import signal
from types import FrameType


def _exit_at_once(signum: int, frame: FrameType | None) -> None:
    os._exit(128 + signum)


for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, _exit_at_once)


def main() -> None:
    from worker.cli import main as command

    command()


if __name__ == "__main__":
    main()
