"""The container runtime engine: run a command in an already-mounted rootfs directory.

::

    from layerfs.runtime import ContainerSpec, start

    spec = ContainerSpec(rootfs=Path("/mnt/rootfs"), argv=["sh", "-c", "echo hi"],
                         network="none", memory=64 << 20)
    c = start(spec, "/var/lib/layerfs/run")      # returns once argv is exec'd
    status = c.wait()                            # ExitStatus(code=0, signal=None, oom_killed=False)

Modules: :mod:`.spec` (what to run), :mod:`.engine` (lifecycle and state),
:mod:`.state` (records, ``ps``, crash cleanup), :mod:`.init` (PID 1),
:mod:`.namespaces` (mounts, pivot_root, setns),
:mod:`.security` (capabilities, fds), :mod:`.cgroups` (v1 and v2 limits),
:mod:`.network` (bridge, veth, IPAM, nftables). docs/runtime.md has the design.
"""

from ..units import parse_size  # re-exported: the runtime API takes sizes
from .engine import (
    ExecProcess,
    ExitStatus,
    RunningContainer,
    RuntimeConfig,
    exec_in,
    run_detached,
    running,
    start,
)
from .spec import (
    ContainerSpec,
    IdMap,
    PortMapping,
    Volume,
    parse_env,
    parse_port,
    parse_security_opts,
    parse_user,
    parse_volume,
)
from .state import ContainerInfo, cleanup_stale, inspect, kill, list_containers, remove

__all__ = [
    "ContainerInfo", "ContainerSpec", "ExecProcess", "ExitStatus", "IdMap", "PortMapping",
    "RunningContainer", "RuntimeConfig", "Volume", "cleanup_stale", "exec_in", "inspect", "kill",
    "list_containers", "parse_env", "parse_port", "parse_security_opts", "parse_size",
    "parse_user", "parse_volume",
    "remove", "run_detached", "running", "start",
]
