"""Progress bars for long operations (tqdm.auto: a widget in Jupyter, text in a terminal).

Every long operation takes ``progress``: ``True`` shows its bar, ``False`` hides it, ``None`` (the default) shows it
only in interactive sessions, i.e. when stderr is a terminal or inside a Jupyter kernel. That is tqdm's
``disable=None`` convention (off when not a TTY, so CI logs and batch jobs stay clean), extended to notebooks,
whose stderr is not a TTY.
"""

from __future__ import annotations

import sys
import warnings
from typing import Iterable, Optional, Sequence

from tqdm import TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)  # Jupyter without ipywidgets: tqdm.auto falls back to text bars
    from tqdm.auto import tqdm


def _in_jupyter_kernel() -> bool:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def show_progress(progress: Optional[bool]) -> bool:
    """Whether to show a bar: ``progress`` itself, or for ``None`` whether the session is interactive."""
    if progress is not None:
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True, False or None (None: bars only in interactive sessions), got "
                            f"{type(progress).__name__} ({progress!r}).")
        return progress
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) or _in_jupyter_kernel()


def progress_bar(iterable: Iterable, progress: Optional[bool], desc: str, total: Optional[int] = None,
                 unit: str = "layer") -> Iterable:
    """``iterable`` wrapped in a bar (``progress`` as in :func:`show_progress`)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not show_progress(progress), dynamic_ncols=True)


class LayerProgress:
    """One bar over ``total`` per-layer steps that run elsewhere, e.g. DKM's k-means initialisation, which each layer
    runs lazily in its first enabled forward. The bar opens at the first ``update`` and closes at the last."""

    def __init__(self, total: int, desc: str, progress: Optional[bool]):
        self.total, self.desc, self.show = int(total), desc, show_progress(progress)
        self._bar = None

    def update(self, name: str) -> None:
        if not self.show:
            return
        if self._bar is None:
            # position=0: it opens inside the caller's training loop, usually under the loop's own bar; on one line
            # it briefly covers that bar and leaves its final state above it (no cursor-up escapes in logs)
            self._bar = tqdm(total=self.total, desc=self.desc, unit="layer", position=0, dynamic_ncols=True)
        self._bar.set_postfix_str(name, refresh=False)
        self._bar.update()
        if self._bar.n >= self.total:
            self._bar.close()
            self._bar = None

    def __getstate__(self) -> dict:  # copies and pickles of a model never carry an open bar
        return {**self.__dict__, "_bar": None}


class StageBar:
    """A bar over named stages: ``with StageBar(("a", "b"), progress, desc) as stage: stage("a") ...``; each call
    completes the previous stage and shows the next one's name; a clean exit completes the last."""

    def __init__(self, stages: Sequence[str], progress: Optional[bool], desc: str):
        self._bar = tqdm(total=len(stages), desc=desc, unit="stage", disable=not show_progress(progress),
                         dynamic_ncols=True)
        self._started = False

    def __call__(self, name: str) -> None:
        if self._started:
            self._bar.update()
        self._started = True
        self._bar.set_postfix_str(name)

    def __enter__(self) -> "StageBar":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None and self._started:
            self._bar.update()
        self._bar.close()
