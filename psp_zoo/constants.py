"""Every ``PSP_ZOO_*`` environment variable and the one way an on/off value is read.

Torch-free, so the command line reads them before anything heavy is imported. A value that is
neither on nor off is an error for every command that reads it, never silently "off".
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

from .errors import PspZooError

__all__ = ["MANIFEST_ENV", "HOME_ENV", "MIRROR_ENV", "OFFLINE_ENV", "ENVIRONMENT_VARIABLES", "env_flag",
           "env_text", "env_paths", "MIN_SPEED_IMAGES", "torchrun_rank"]

MANIFEST_ENV = "PSP_ZOO_MANIFEST"  # user manifest file(s), separated by os.pathsep
HOME_ENV = "PSP_ZOO_HOME"          # the checkpoint cache folder
MIRROR_ENV = "PSP_ZOO_MIRROR"      # a base URL serving the zoo's files under the same paths
OFFLINE_ENV = "PSP_ZOO_OFFLINE"    # on: use cached files only
ENVIRONMENT_VARIABLES = (MANIFEST_ENV, HOME_ENV, MIRROR_ENV, OFFLINE_ENV)

ON, OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

#: the fewest images an fps measurement can time: one warm-up (at least) and one timed
MIN_SPEED_IMAGES = 2


def env_flag(name: str) -> bool:
    """An on/off environment variable (unset is off); anything but the usual spellings is an error."""
    value = os.environ.get(name, "").strip().lower()
    if value not in ON + OFF:
        raise PspZooError(f"{name}={os.environ[name]!r} is neither on ({', '.join(ON)}) nor off "
                          f"({', '.join(OFF[1:])}, empty); set it to one of those")
    return value in ON


def env_text(name: str) -> Optional[str]:
    """A text variable, None when unset or empty."""
    return os.environ.get(name) or None


def env_paths(name: str) -> Tuple[str, ...]:
    """A list of paths in one variable, separated by ``os.pathsep`` (empty parts skipped)."""
    return tuple(p for p in (os.environ.get(name) or "").split(os.pathsep) if p)


def torchrun_rank() -> int:
    """This process's rank in a torchrun job (torchrun's ``RANK``), 0 when run alone: the one that speaks."""
    return int(os.environ.get("RANK", "0") or 0)
