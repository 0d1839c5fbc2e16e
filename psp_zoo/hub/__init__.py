"""Getting checkpoint files: ``fetching.py`` moves one file's bytes from its URLs, ``cache.py`` is the
checkpoint cache and the public functions, ``options.py`` the options records passed to them.
``psp_zoo.hub`` keeps the names it had as one module.
"""
from .cache import (  # the public names of the module this package replaced
    cache_dir,
    cache_state,
    cached_path,
    download,
    fetch_file,
    first_sha256_record,
    forget_failed_hosts,
    is_cached,
    resolve_url,
)

__all__ = ["download", "fetch_file", "cache_dir", "cached_path", "cache_state", "is_cached", "resolve_url",
           "forget_failed_hosts", "first_sha256_record"]
