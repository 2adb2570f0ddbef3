"""The one error hierarchy of layerfs.

Every failure a caller can act on is a :class:`LayerfsError`; the subclass says
what kind of failure it is, so callers (the CLI, the runner, the bench, test
skips, driver auto-selection) branch on the type, never on message text.
Messages always name the layer id and/or path involved.
"""

from __future__ import annotations

import functools

TYPE_CHECKING = False      # typing and subprocess only for mypy: see docs/architecture.md
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable
    from typing import ParamSpec, TypeVar

    P = ParamSpec("P")
    R = TypeVar("R")


class LayerfsError(Exception):
    """Base class for every error layerfs raises on purpose."""


class NotFound(LayerfsError, LookupError):
    """A layer, image, container or path that does not exist."""


class AlreadyExists(LayerfsError):
    """Creating something whose name or id is taken."""


class InUse(LayerfsError):
    """Refused because something depends on it (children, a mount, a container)."""


class FailedPrecondition(LayerfsError):
    """Refused because the object is in the wrong state for the operation
    (committing a snapshot that is not active, mounting a committed one)."""


class InvalidArgument(LayerfsError, ValueError):
    """Bad input from the caller: options, names, archives."""


class UnsafeArchive(InvalidArgument):
    """A layer tar that tries to write outside its root, or is otherwise hostile."""


class DriverNotSupported(LayerfsError):
    """The host lacks something a driver needs; ``reason`` says what.

    Auto-selection skips a driver that raises this, ``layerfs info`` shows the
    reason, and the conformance suite skips with it.
    """

    def __init__(self, driver: str, reason: str) -> None:
        super().__init__(f"{driver}: {reason}")
        self.driver = driver
        self.reason = reason


class DiskFull(LayerfsError):
    """The filesystem holding the root (or a file being written) has no space left."""


class CorruptState(LayerfsError):
    """On-disk state that contradicts the metadata store."""


class ExternalCommandFailed(LayerfsError):
    """A system tool (mkfs, dmsetup, iptables, ...) exited non-zero."""


def command_error(err: subprocess.CalledProcessError) -> ExternalCommandFailed:
    """Turn a failed ``subprocess.run(check=True)`` into one readable line."""
    cmd = err.cmd if isinstance(err.cmd, str) else " ".join(map(str, err.cmd))
    stderr = err.stderr
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    detail = (stderr or "").strip().splitlines()
    tail = f": {detail[-1]}" if detail else ""
    return ExternalCommandFailed(f"`{cmd}` exited {err.returncode}{tail}")


def translate_errors(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator for driver entry points: OS and tool failures become LayerfsError.

    ``what`` names the operation for the message ("overlay2 create"). The original
    exception is kept as ``__cause__``.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except LayerfsError:
                raise
            except FileNotFoundError as err:
                raise NotFound(f"{what}: {err.filename or err}: no such file") from err
            except OSError as err:
                target = f" {err.filename}" if err.filename else ""
                raise LayerfsError(f"{what}:{target}: {err.strerror or err}") from err
            except Exception as err:
                import subprocess  # only here: importing it costs every command

                if isinstance(err, subprocess.CalledProcessError):
                    raise command_error(err) from err
                raise

        return wrapper

    return decorate
