"""``python -m synthpipe.launch.torchrun ARGS``: torchrun with ARGS, ending cleanly when a
signal stopped the job.

``synthpipe train --nproc N`` becomes this process (``exec``). torchrun itself answers a
SIGTERM or Ctrl-C by passing it on to the ranks, waiting for them, and then raising its
``SignalException`` with a traceback and exit code 1; and a rank that stopped cleanly on
a signal (exit 130 or 143, its checkpoint saved) is reported as a ``ChildFailedError``
with another traceback. Here both become one line and the exit code a shell expects of a
command stopped by that signal (128 + signal). Anything else is torchrun's own doing.
"""
from __future__ import annotations

import signal
import sys

__all__ = ["CLEAN_STOPS", "main"]

# What a rank's exit code says when synthpipe train stopped it on a signal after saving.
CLEAN_STOPS = {128 + signal.SIGINT: "SIGINT", 128 + signal.SIGTERM: "SIGTERM"}


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except SignalException as e:
        signum = int(e.sigval)
        print(f"synthpipe train: torchrun stopped by {_name(signum)}; its ranks were passed the signal and have "
              f"exited (each says above whether it saved)", file=sys.stderr, flush=True)
        return 128 + signum
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if not codes <= set(CLEAN_STOPS):
            raise  # a real failure: torchrun's report, with each rank's error
        code = max(codes)
        ranks = ", ".join(str(r) for r in sorted(e.failures))  # (global ranks)
        print(f"synthpipe train: ranks {ranks} stopped on {', '.join(sorted({CLEAN_STOPS[c] for c in codes}))} "
              f"after saving (exit {code})", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
