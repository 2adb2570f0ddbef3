"""Pause points for the kill -9 tests, installed in a daemon before it serves.

The test starts ``layerfs daemon`` through :func:`main`, which first wraps a few
library functions. A wrapper does nothing unless the command's environment (the
worker adopts the client's) names its step in ``LAYERFS_TEST_HANG``: then it
touches ``LAYERFS_TEST_HANG_MARKER`` and sleeps, so that the test kills the
daemon at exactly that step of the real command.

``LAYERFS_TEST_SLOW_RECOVERY=SECONDS`` in the daemon's own environment makes its
recovery child hold each container it took over that long before finishing it.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS = ("run-created", "run-mounted", "run-started", "run-exited", "remove")


def _hang(step: str) -> None:
    if os.environ.get("LAYERFS_TEST_HANG") == step:
        Path(os.environ["LAYERFS_TEST_HANG_MARKER"]).touch()
        time.sleep(3600)


def _after(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        _hang(step)
        return result
    return wrapper


def _before(step: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _hang(step)
        return fn(*args, **kwargs)
    return wrapper


def _slow_claim(fn: Callable[..., Any]) -> Callable[..., Any]:
    delay = float(os.environ.get("LAYERFS_TEST_SLOW_RECOVERY", "0"))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        claimed = fn(*args, **kwargs)
        if claimed and delay and os.environ.get("LAYERFS_TEST_SLOW_RECOVERY"):
            time.sleep(delay)         # the daemon's recovery child (workers adopt the
        return claimed                # client's environment, which does not name it)
    return wrapper


def install() -> None:
    from layerfs import plugins
    from layerfs.layers import LayerStore
    from layerfs.runtime import engine
    from layerfs.runtime.containers import ContainerManager

    LayerStore.create = _after("run-created", LayerStore.create)  # type: ignore[method-assign]
    LayerStore.mount = _after("run-mounted", LayerStore.mount)  # type: ignore[method-assign]
    engine.start = _after("run-started", engine.start)
    ContainerManager._after_exit = _before(  # type: ignore[method-assign]
        "run-exited", ContainerManager._after_exit)
    ContainerManager._claim = _slow_claim(ContainerManager._claim)  # type: ignore[method-assign]
    for name in plugins.registered():
        cls = plugins.load(name)
        cls.remove = _before("remove", cls.remove)  # type: ignore[method-assign]


def main() -> int:
    install()
    from layerfs._entry import main as layerfs_main

    return layerfs_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
