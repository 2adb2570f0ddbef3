"""Container networking: a bridge, one veth pair per container, IPAM, NAT by nftables.

```
host                                              container netns
  <bridge> 10.87.0.1/16  (route_localnet=1)         lo  (brought up by the container itself)
    └─ lfv<id[:12]> ── veth ────────────────────── eth0 10.87.0.N/16, default via 10.87.0.1
nft table ip <table>   (chains created once, rules per container, comment "layerfs:<id>")
  prerouting  nat   fib daddr type local tcp dport HP dnat to 10.87.0.N:CP     (-p, from outside)
  output      nat   fib daddr type local tcp dport HP dnat to 10.87.0.N:CP     (-p, from this host)
  postrouting nat   ip saddr 10.87.0.N oifname != <bridge> masquerade          (outbound)
              nat   ip saddr {127.0.0.0/8, subnet} ip daddr N dport CP ct status dnat masquerade
<state_dir>/network.db   sqlite: leases(network, address, owner), ports(proto, ip, port, owner)
```

Links and addresses are set with iproute2 in batch mode (``ip -b -``: one process
per side, not one per command) and rules with one ``nft -e -a -f -`` per container,
whose echo gives each rule's handle. Rules are removed by those handles; a
runner that died before recording them is cleaned up by the rules' exact comment
``layerfs:<container id>``. pyroute2 is not used: importing it costs ~130 ms, more
than the whole start path (docs/runtime.md, "Speed").

Publishing to the host's loopback (``curl 127.0.0.1:HP``) needs the OUTPUT-chain
DNAT, ``route_localnet=1`` on the bridge only (not ``all``: the setting lives and
dies with the bridge) and the masquerade of 127/8 sources so replies come back.
Outbound traffic also needs IPv4 forwarding: the bridge's own ``forwarding`` is
always set; the global ``net.ipv4.ip_forward`` only when ``NetworkConfig.ip_forward``
is true (Docker does the same and, like Docker, layerfs leaves it on).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExternalCommandFailed, InUse, InvalidArgument, LayerfsError
from . import _sys
from .spec import PortMapping

DEFAULT_BRIDGE = "layerfs0"
DEFAULT_SUBNET = "10.87.0.0/16"
DEFAULT_TABLE = "layerfs"
_IFNAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,15}$")
_TABLE_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_]{0,31}$")
_HANDLE_RE = re.compile(r"^add rule ip \S+ (\S+) .* # handle (\d+)$")


@dataclass(frozen=True)
class NetworkConfig:
    """Which bridge, subnet and nft table containers in bridge mode use."""

    bridge: str = DEFAULT_BRIDGE
    subnet: str = DEFAULT_SUBNET
    table: str = DEFAULT_TABLE
    mtu: int = 1500
    ip_forward: bool = True
    dns: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not _IFNAME_RE.match(self.bridge):
            raise InvalidArgument(f"bridge name {self.bridge!r}: 1-15 of [a-zA-Z0-9_.-]")
        if not _TABLE_RE.match(self.table):
            raise InvalidArgument(f"nft table name {self.table!r}: a letter, then [a-zA-Z0-9_]")
        try:
            net = ipaddress.IPv4Network(self.subnet)
        except ValueError as err:
            raise InvalidArgument(f"subnet {self.subnet!r}: {err}") from err
        if net.prefixlen > 29:
            raise InvalidArgument(f"subnet {self.subnet}: too small (at most /29)")
        object.__setattr__(self, "dns", tuple(self.dns))

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    def to_record(self) -> dict[str, object]:
        return {"bridge": self.bridge, "subnet": self.subnet, "table": self.table,
                "mtu": self.mtu, "ip_forward": self.ip_forward, "dns": list(self.dns)}

    @classmethod
    def from_record(cls, rec: dict[str, object]) -> NetworkConfig:
        return cls(**rec)  # type: ignore[arg-type]


@dataclass
class Attachment:
    """What one container holds on the network: recorded in its state, undone exactly."""

    container_id: str
    bridge: str
    table: str
    veth: str
    address: str
    prefixlen: int
    gateway: str
    ports: list[PortMapping] = field(default_factory=list)
    rules: list[tuple[str, int]] = field(default_factory=list)  # (chain, handle)

    @property
    def comment(self) -> str:
        return rule_comment(self.container_id)

    def to_record(self) -> dict[str, object]:
        return {"container_id": self.container_id, "bridge": self.bridge, "table": self.table,
                "veth": self.veth, "address": self.address, "prefixlen": self.prefixlen,
                "gateway": self.gateway,
                "ports": [[p.host_port, p.container_port, p.protocol, p.host_ip]
                          for p in self.ports],
                "rules": [list(r) for r in self.rules]}

    @classmethod
    def from_record(cls, rec: dict[str, object]) -> Attachment:
        data = dict(rec)
        data["ports"] = [PortMapping(*p) for p in data.get("ports", [])]  # type: ignore[attr-defined]
        data["rules"] = [(c, int(h)) for c, h in data.get("rules", [])]  # type: ignore[attr-defined]
        return cls(**data)  # type: ignore[arg-type]


def rule_comment(container_id: str) -> str:
    return f"layerfs:{container_id}"


def veth_name(container_id: str) -> str:
    return "lfv" + container_id[:12]


# --- helpers ------------------------------------------------------------------------------------
def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as err:
        cmd = " ".join(argv)
        detail = (err.stderr or "").strip().splitlines()
        raise ExternalCommandFailed(f"`{cmd}` exited {err.returncode}: "
                                    f"{detail[-1] if detail else ''} (input: {stdin!r})") from err
    except FileNotFoundError as err:
        raise ExternalCommandFailed(f"`{argv[0]}` is not installed (iproute2/nftables)") from err
    return proc.stdout


def _sysctl_write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


@contextlib.contextmanager
def in_netns(fd: int) -> Iterator[None]:
    """Switch *this thread* into the network namespace ``fd``; processes it spawns follow.

    A netns is per thread, so other threads of the runner are not affected.
    """
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _sys.setns(fd, _sys.CLONE_NEWNET)
        try:
            yield
        finally:
            _sys.setns(back, _sys.CLONE_NEWNET)
    finally:
        os.close(back)


@contextlib.contextmanager
def _locked(state_dir: Path, name: str) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- IPAM --------------------------------------------------------------------------------------
class Ipam:
    """Addresses and published ports, leased to container ids, in ``<state_dir>/network.db``."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "network.db"
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a crash of the process (what matters for a
        # runner killed with -9), not necessarily a power cut; no fsync per lease.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS leases (network TEXT NOT NULL, address TEXT "
                        "NOT NULL, owner TEXT NOT NULL, PRIMARY KEY (network, address))")
        self.db.execute("CREATE TABLE IF NOT EXISTS ports (proto TEXT NOT NULL, host_ip TEXT NOT "
                        "NULL, host_port INTEGER NOT NULL, owner TEXT NOT NULL, "
                        "PRIMARY KEY (proto, host_ip, host_port))")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ipam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def allocate(self, cfg: NetworkConfig, owner: str, ports: Sequence[PortMapping] = ()) -> str:
        """Lease the lowest free address of ``cfg.subnet`` (and ``ports``) to ``owner``."""
        net = cfg.network
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for p in ports:
                # 0.0.0.0 conflicts with every address, so compare on the port alone.
                row = self.db.execute("SELECT owner FROM ports WHERE proto=? AND host_port=? AND "
                                      "(host_ip=? OR host_ip='0.0.0.0' OR ?='0.0.0.0')",
                                      (p.protocol, p.host_port, p.host_ip or "0.0.0.0",
                                       p.host_ip or "0.0.0.0")).fetchone()
                if row:
                    raise InUse(f"host port {p.host_port}/{p.protocol} is already published by "
                                f"container {row[0][:12]}")
                self.db.execute("INSERT INTO ports VALUES (?, ?, ?, ?)",
                                (p.protocol, p.host_ip or "0.0.0.0", p.host_port, owner))
            used = {r[0] for r in self.db.execute("SELECT address FROM leases WHERE network=?",
                                                  (cfg.subnet,))}
            used.add(cfg.gateway)
            address = next((str(h) for h in net.hosts() if str(h) not in used), None)
            if address is None:
                raise InUse(f"network {cfg.bridge} ({cfg.subnet}): no free address left")
            self.db.execute("INSERT INTO leases VALUES (?, ?, ?)", (cfg.subnet, address, owner))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return address

    def release(self, owner: str) -> None:
        """Drop every address and port leased to ``owner`` (exact id)."""
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("DELETE FROM leases WHERE owner=?", (owner,))
        self.db.execute("DELETE FROM ports WHERE owner=?", (owner,))
        self.db.execute("COMMIT")

    def leases(self, subnet: str | None = None) -> list[tuple[str, str]]:
        """``(address, owner)`` pairs, optionally for one subnet."""
        if subnet is None:
            rows = self.db.execute("SELECT address, owner FROM leases")
        else:
            rows = self.db.execute("SELECT address, owner FROM leases WHERE network=?", (subnet,))
        return [(r[0], r[1]) for r in rows]

    def ports(self) -> list[tuple[str, str, int, str]]:
        return [(r[0], r[1], int(r[2]), r[3]) for r in self.db.execute("SELECT * FROM ports")]


# --- bridge and table ---------------------------------------------------------------------------
def _table_script(cfg: NetworkConfig) -> str:
    t = cfg.table
    return (f"add table ip {t}\n"
            f"add chain ip {t} prerouting {{ type nat hook prerouting priority dstnat; }}\n"
            f"add chain ip {t} output {{ type nat hook output priority -100; }}\n"
            f"add chain ip {t} postrouting {{ type nat hook postrouting priority srcnat; }}\n")


def ensure_table(cfg: NetworkConfig) -> None:
    """Create the nft table and its three NAT chains (idempotent)."""
    _run(["nft", "-f", "-"], _table_script(cfg))


def ensure_bridge(cfg: NetworkConfig, state_dir: Path) -> None:
    """Create the bridge with the gateway address, its sysctls and the nft table, if missing.

    Cheap when the bridge exists (one stat), so the engine calls it on every start.
    """
    if link_exists(cfg.bridge):
        return
    with _locked(state_dir, "network.lock"):
        if link_exists(cfg.bridge):
            return
        prefix = cfg.network.prefixlen
        _run(["ip", "-b", "-"],
             f"link add {cfg.bridge} mtu {cfg.mtu} type bridge\n"
             f"addr add {cfg.gateway}/{prefix} dev {cfg.bridge}\n"
             f"link set {cfg.bridge} up\n")
        try:
            conf = f"/proc/sys/net/ipv4/conf/{cfg.bridge}"
            _sysctl_write(f"{conf}/route_localnet", "1")
            _sysctl_write(f"{conf}/forwarding", "1")
            if cfg.ip_forward:
                _sysctl_write("/proc/sys/net/ipv4/ip_forward", "1")
            ensure_table(cfg)
        except BaseException:
            _run(["ip", "link", "del", cfg.bridge])
            raise


def remove_network(cfg: NetworkConfig, state_dir: Path) -> None:
    """Delete the bridge and the nft table (exact names); refused while addresses are leased."""
    with Ipam(state_dir) as ipam:
        leased = ipam.leases(cfg.subnet)
    if leased:
        raise InUse(f"network {cfg.bridge}: {len(leased)} address(es) still leased, first to "
                    f"{leased[0][1][:12]}")
    if link_exists(cfg.bridge):
        _run(["ip", "link", "del", cfg.bridge])
    tables = _run(["nft", "list", "tables", "ip"])
    if f"table ip {cfg.table}\n" in tables + "\n":
        _run(["nft", "delete", "table", "ip", cfg.table])


# --- per container ------------------------------------------------------------------------------
def _rules_script(cfg: NetworkConfig, att: Attachment) -> str:
    t, c, ip = cfg.table, f'comment "{att.comment}"', att.address
    lines = [f'add rule ip {t} postrouting ip saddr {ip} oifname != "{cfg.bridge}" masquerade {c}']
    for p in att.ports:
        dst = f"ip daddr {p.host_ip}" if p.host_ip and p.host_ip != "0.0.0.0" \
            else "fib daddr type local"
        dnat = f"{dst} {p.protocol} dport {p.host_port} dnat to {ip}:{p.container_port} {c}"
        lines.append(f"add rule ip {t} prerouting {dnat}")
        lines.append(f"add rule ip {t} output {dnat}")
        lines.append(f"add rule ip {t} postrouting ip saddr {{ 127.0.0.0/8, {cfg.subnet} }} "
                     f"ip daddr {ip} {p.protocol} dport {p.container_port} ct status dnat "
                     f"masquerade {c}")
    return "\n".join(lines) + "\n"


def plan(cfg: NetworkConfig, state_dir: Path, container_id: str,
         ports: Sequence[PortMapping]) -> Attachment:
    """Lease an address (and the host ports) for ``container_id``; nothing is created yet."""
    with Ipam(state_dir) as ipam:
        address = ipam.allocate(cfg, container_id, ports)
    return Attachment(container_id, cfg.bridge, cfg.table, veth_name(container_id), address,
                      cfg.network.prefixlen, cfg.gateway, list(ports))


class _Spawned:
    """A started helper (``ip -b -`` / ``nft -f -``) whose result is collected later."""

    def __init__(self, argv: list[str], script: str) -> None:
        self.argv, self.script = argv, script
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out, self.err = "", ""
        self._done = False

    def result(self) -> str:
        if not self._done:
            self.out, self.err = self.proc.communicate(self.script)
            self._done = True
        if self.proc.returncode != 0:
            detail = self.err.strip().splitlines()
            raise ExternalCommandFailed(
                f"`{' '.join(self.argv)}` exited {self.proc.returncode}: "
                f"{detail[-1] if detail else ''} (input: {self.script!r})")
        return self.out


def attach(cfg: NetworkConfig, att: Attachment, netns_pid: int, netns_fd: int) -> None:
    """Create the veth pair into the container's netns, address it, add the NAT rules.

    The nft batch runs while the links are made (three helper processes, two of
    them in sequence). Fills ``att.rules`` with the handles of the rules it added,
    even when something else failed, so that :func:`detach` (which the caller
    always runs on failure) removes exactly what exists.
    """
    nft = _Spawned(["nft", "-e", "-a", "-f", "-"], _rules_script(cfg, att))
    failure: ExternalCommandFailed | None = None
    try:
        _Spawned(["ip", "-b", "-"],
                 f"link add {att.veth} mtu {cfg.mtu} type veth peer name eth0 mtu {cfg.mtu} "
                 f"netns {netns_pid}\n"
                 f"link set {att.veth} master {cfg.bridge} up\n").result()
        with in_netns(netns_fd):
            inside = _Spawned(["ip", "-b", "-"],
                              f"addr add {att.address}/{att.prefixlen} dev eth0\n"
                              f"link set eth0 up\n"
                              f"route add default via {att.gateway}\n")
        inside.result()
    except ExternalCommandFailed as err:
        failure = err
    try:
        out = nft.result()
    except ExternalCommandFailed as err:
        if "No such file or directory" not in str(err):
            raise failure or err from None
        ensure_table(cfg)  # someone flushed the ruleset: recreate the chains, retry once
        out = _Spawned(["nft", "-e", "-a", "-f", "-"], _rules_script(cfg, att)).result()
    for line in out.splitlines():
        m = _HANDLE_RE.match(line.strip())
        if m:
            att.rules.append((m.group(1), int(m.group(2))))
    if failure is not None:
        raise failure


def _rules_with_comment(table: str, comment: str) -> list[tuple[str, int]]:
    try:
        data = json.loads(_run(["nft", "-j", "-a", "list", "table", "ip", table]))
    except ExternalCommandFailed as err:
        if "No such file or directory" in str(err):
            return []
        raise
    found = []
    for item in data.get("nftables", []):
        rule = item.get("rule")
        if rule and rule.get("comment") == comment:
            found.append((rule["chain"], int(rule["handle"])))
    return found


def detach(att: Attachment, state_dir: Path, *, verify: bool = False) -> None:
    """Undo :func:`attach` and :func:`plan`: rules by handle, the veth by name, the leases.

    With ``verify`` (crash recovery) the rules are found by their exact comment
    instead of trusting recorded handles, which also covers rules added after
    the last state write. Idempotent: what is already gone is skipped.

    The rule deletion and the veth deletion run at the same time: each waits for
    an RCU grace period in the kernel (nf_tables flushes its destroy work when
    nft closes its netlink socket; unregistering a netdev synchronizes), ~10 ms
    each on the dev VM.
    """
    errors: list[str] = []
    rules = _rules_with_comment(att.table, att.comment) if verify else att.rules
    nft = _Spawned(["nft", "-f", "-"], "".join(
        f"delete rule ip {att.table} {chain} handle {handle}\n"
        for chain, handle in rules)) if rules else None
    veth = _Spawned(["ip", "link", "del", att.veth], "") if link_exists(att.veth) else None
    if nft is not None:
        try:
            nft.result()
        except ExternalCommandFailed:
            # A batch is atomic: one stale handle fails all. Retry with what really exists.
            rest = _rules_with_comment(att.table, att.comment)
            if rest:
                try:
                    _run(["nft", "-f", "-"], "".join(
                        f"delete rule ip {att.table} {c} handle {h}\n" for c, h in rest))
                except ExternalCommandFailed as err:
                    errors.append(str(err))
    att.rules = []
    if veth is not None:
        try:
            veth.result()
        except ExternalCommandFailed as err:
            if link_exists(att.veth):  # else the netns teardown removed it meanwhile
                errors.append(str(err))
    with Ipam(state_dir) as ipam:
        ipam.release(att.container_id)
    if errors:
        raise LayerfsError(f"network cleanup of container {att.container_id[:12]}: "
                           + "; ".join(errors))
