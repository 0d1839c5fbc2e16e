"""Run ``psp-zoo reproduce ARGS`` and exit hard after N scored images, as a kill would.

Usage: python crash_reproduce.py N reproduce ARGS...  (test_reproduce's resume tests)
"""
import os
import sys

from psp_zoo import cli
from psp_zoo.evaluation import reproduction

CRASH_EXIT_CODE = 75


def main() -> int:
    limit, argv = int(sys.argv[1]), sys.argv[2:]
    original, scored = reproduction.reproduce, [0]

    def on_image(_done: int) -> None:
        scored[0] += 1
        if scored[0] >= limit:
            os._exit(CRASH_EXIT_CODE)  # no cleanup, no flush, nothing written after

    reproduction.reproduce = lambda *args, **kwargs: original(*args, on_image=on_image, **kwargs)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
