"""One way to make a progress bar, so ``TQDM_DISABLE=1`` silences every bar of the package.

tqdm reads ``TQDM_*`` environment variables only for arguments the caller leaves unset: an explicit
``disable=False`` (what ``disable=not show_progress`` passes when a bar is wanted) overrides
``TQDM_DISABLE=1``. So ``show=True`` passes nothing and lets tqdm's defaults and the environment
decide; ``show=False`` forces the bar off.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(iterable, desc: str, show: bool = True, **kwargs):
    """``tqdm(iterable, desc=desc)``: off when ``show`` is false, otherwise as the environment says."""
    if not show:
        kwargs["disable"] = True
    return tqdm(iterable, desc=desc, **kwargs)
