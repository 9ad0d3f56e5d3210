"""`python -m tests.bench [NAME ...]`: run the named benchmarks (all of them by default);
`python -m tests.bench NAME [OPTIONS]`: one, with its options (`... NAME --help` lists them)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module also runs alone with its own options (`python -m tests.bench.receiver --help`).
# Imports are lazy: one benchmark's imports do not slow down, or break, another's.
NAMES = ("receiver", "worker", "status", "nightly", "growth", "backfill", "soak")


def run(name: str, argv: list[str]) -> None:
    importlib.import_module(f"tests.bench.{name}").main(argv)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"{', '.join(NAMES)} (default: all)"
    )
    # Whatever follows the first option is that one benchmark's (its own --help says which).
    argv = sys.argv[1:]
    first_option = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    if first_option == 0 and argv:
        parser.parse_args(argv)  # -h, or an option without a benchmark: argparse says so
    names, options = argv[:first_option], argv[first_option:]
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(NAMES)}")
    if options and len(names) != 1:
        parser.error("options go to one benchmark: python -m tests.bench NAME [OPTIONS]")
    for name in names or NAMES:
        run(name, options)


if __name__ == "__main__":
    main()
