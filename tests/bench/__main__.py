"""`python -m tests.bench [NAME ...]`: run the named benchmarks (all of them by default)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _receiver() -> None:
    from tests.bench import receiver

    receiver.main([])


def _worker() -> None:
    from tests.bench import worker

    worker.main([])


def _status() -> None:
    from tests.bench import status

    status.main([])


def _nightly() -> None:
    from tests.bench import nightly

    nightly.main([])


def _growth() -> None:
    from tests.bench import growth

    growth.main([])


def _backfill() -> None:
    from tests.bench import backfill

    backfill.main([])


# Name -> runner with its default options; each module also runs alone with its own options
# (`python -m tests.bench.receiver --help`). Imports are lazy: one benchmark's imports do not
# slow down, or break, another's.
BENCHMARKS: dict[str, Callable[[], None]] = {
    "receiver": _receiver,
    "worker": _worker,
    "status": _status,
    "nightly": _nightly,
    "growth": _growth,
    "backfill": _backfill,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"{', '.join(BENCHMARKS)} (default: all)"
    )
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    for name in args.names or BENCHMARKS:
        BENCHMARKS[name]()


if __name__ == "__main__":
    main()
