"""The values :class:`~.containers.ContainerManager` takes and returns.

:class:`RunOptions` (``layerfs run``'s flags), :class:`ContainerState` (a
container as ``ps`` and ``inspect`` see it), :class:`Container` (a container
attached to this process, from :meth:`ContainerManager.run`) and
:func:`signal_number` (a signal as Docker names it). Apart from the manager so
that a reader (and the CLI) sees the shapes before the lifecycle.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import InvalidArgument
from ..images import Image
from .spec import PortMapping, Volume

if TYPE_CHECKING:
    from .containers import ContainerManager
    from .engine import ExecProcess, ExitStatus, RunningContainer

Stdio = int | IO[Any] | None


# --- what a container is run with ---------------------------------------------------------------

@dataclass(frozen=True)
class RunOptions:
    """``layerfs run`` flags, Docker's meaning. ``None`` means "what the image says"."""

    name: str | None = None
    hostname: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    entrypoint: Sequence[str] | None = None
    workdir: str | None = None
    user: str | None = None                    # uid[:gid] or name[:group] from the image
    memory: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    network: str = "bridge"
    ports: Sequence[PortMapping] = ()
    volumes: Sequence[Volume] = ()
    userns: bool = False
    read_only: bool = False
    auto_remove: bool = False
    cap_add: Sequence[str] = ()
    cap_drop: Sequence[str] = ()
    security_opt: Sequence[str] = ()           # Docker's --security-opt values


@dataclass
class ContainerState:
    """One container as ``ps`` and ``inspect`` see it (the table row plus the engine's record)."""

    id: str
    name: str | None
    image: str                 # image id
    image_ref: str             # as given to run
    layer: str
    status: str                # created | running | exited | dead | removing
    created: float
    auto_remove: bool
    config: dict[str, Any]
    pid: int | None = None
    started: float | None = None
    finished: float | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    oom_killed: bool = False
    address: str | None = None
    ports: list[str] = field(default_factory=list)
    log_path: Path | None = None
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def argv(self) -> list[str]:
        return list(self.config.get("argv", []))


# --- a container attached to this process ---------------------------------------------------------

class Container:
    """A container started by :meth:`ContainerManager.run` in this process.

    :meth:`wait` waits for it to exit, then frees its host resources and its
    layer's mount (and, with ``auto_remove``, the layer and the record).
    """

    def __init__(self, manager: ContainerManager, cid: str, name: str | None, image: Image,
                 running: RunningContainer) -> None:
        self.manager = manager
        self.id = cid
        self.name = name
        self.image = image
        self.engine = running
        self.status: ExitStatus | None = None

    def __repr__(self) -> str:
        return f"<Container {self.id[:12]} pid={self.pid}>"

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def pid(self) -> int:
        return self.engine.pid

    @property
    def address(self) -> str | None:
        return self.engine.address

    @property
    def rootfs(self) -> Path:
        return self.engine.spec.rootfs

    def kill(self, sig: int = signal.SIGTERM) -> None:
        self.engine.kill(sig)

    def exec(self, argv: Sequence[str], **kwargs: Any) -> ExecProcess:
        return self.engine.exec(argv, **kwargs)

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Exit status of the main process (``TimeoutError`` if still running after ``timeout``)."""
        if self.status is None:
            try:
                status = self.engine.wait(timeout)
            except TimeoutError:
                raise
            except BaseException:
                self.manager._after_exit(self.id)
                raise
            self.manager._after_exit(self.id)
            self.status = status
        return self.status

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is None:
            self.kill(signal.SIGKILL)
            self.wait()


def signal_number(name: str | int) -> int:
    """A signal given as Docker takes it: a number, ``KILL`` or ``SIGKILL``."""
    if isinstance(name, int) or str(name).isdigit():
        return int(name)
    text = str(name).upper()
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signal.Signals[text])
    except KeyError:
        raise InvalidArgument(f"unknown signal {name!r}") from None

