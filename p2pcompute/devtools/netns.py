"""A NAT topology in network namespaces for tests and benchmarks: an "internet" bridge, public hosts, home routers
doing iptables MASQUERADE with a host behind each; `p2pc` processes started inside them, all removed by PID/name.

    internet (bridge in its own namespace, 10.99.0.0/24)
     ├─ public host  boot   10.99.0.10
     ├─ public host  pub    10.99.0.11
     ├─ router r1    wan 10.99.0.21 ── lan 10.99.1.1 ── host h1 10.99.1.10   (MASQUERADE, inbound dropped)
     └─ router r2    wan 10.99.0.22 ── lan 10.99.2.1 ── host h2 10.99.2.10

Nothing routes to the LANs from the internet side, and a router forwards only replies inbound: a host behind a
router can dial out, nobody can dial in, as behind a home router. Every namespace is named `<prefix><suffix>-<host>`
(the suffix random) and deleted by `shutdown()`; the root namespace is left untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from p2pcompute.node.launcher import NodeProcess

NS_PREFIX = "nat-"  # every namespace made here starts with this (or with $P2PC_NETNS_PREFIX)
INTERNET = "10.99.0"  # the "public" /24; routers' LANs are 10.99.<router number>.0/24
ROUTER_WAN_BASE = 20  # router N is 10.99.0.(20+N) on the internet side
PUBLIC_HOSTS = {"boot": 10, "pub": 11}  # public hosts and their last octet
COMMAND_TIMEOUT = 30.0  # seconds for one `ip`/`iptables` command (they take milliseconds)
CLI_TIMEOUT = 180.0  # seconds for one `p2pc` command inside a namespace (~60 s seen on a 2-core box at load 17)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


def unavailable() -> str | None:
    """None if this process can build the topology (root, `ip netns`, iptables); else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2 iptables)"
    probe = f"{os.environ.get('P2PC_NETNS_PREFIX') or NS_PREFIX}probe-{secrets.token_hex(3)}"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L")
        return None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        return f"cannot make a namespace with NAT here: {(getattr(e, 'stderr', '') or repr(e)).strip()}"
    finally:
        sh("ip", "netns", "del", probe, check=False)


@dataclasses.dataclass(frozen=True)
class Host:
    name: str  # "boot", "pub", "h1", ...
    namespace: str
    address: str  # its IPv4 address on its own network
    behind_nat: bool


class NatTopology:
    """`start()` builds the namespaces (a context manager too); `shutdown()` stops every process started with
    `spawn()` (by PID group) and deletes every namespace, also after a failed start."""

    def __init__(self, root: Path, routers: int = 2, prefix: str | None = None, extra_public: int = 0):
        self.root = Path(root)
        self.suffix = secrets.token_hex(2)
        # several people's tests on one machine: each may name its namespaces (P2PC_NETNS_PREFIX=<branch>-)
        self.prefix = (prefix or os.environ.get("P2PC_NETNS_PREFIX") or NS_PREFIX) + self.suffix
        self.routers = routers
        # more public hosts, "pub2", "pub3", ... at 10.99.0.12, .13, ... (an all-public swarm to compare with)
        self.public_hosts = dict(PUBLIC_HOSTS, **{f"pub{i + 2}": PUBLIC_HOSTS["pub"] + 1 + i
                                                  for i in range(extra_public)})
        self.hosts: dict[str, Host] = {}
        self.procs: list[NodeProcess] = []
        self._namespaces: list[str] = []
        self._ports: dict[str, str] = {}  # namespace -> its port on the internet bridge

    # ---- building ------------------------------------------------------------------------------------
    def _ns(self, name: str) -> str:
        namespace = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", namespace)
        self._namespaces.append(namespace)
        sh("ip", "-n", namespace, "link", "set", "lo", "up")
        return namespace

    def _veth(self, ns_a: str, ns_b: str, tag: str) -> tuple[str, str]:
        """A veth pair between two namespaces; interface names are unique to this topology (<= 15 characters)."""
        a, b = f"n{self.suffix}{tag}a", f"n{self.suffix}{tag}b"
        sh("ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b)
        sh("ip", "-n", ns_a, "link", "set", a, "up")
        sh("ip", "-n", ns_b, "link", "set", b, "up")
        return a, b

    def _to_internet(self, namespace: str, tag: str, address: str) -> str:
        """Plug `namespace` into the internet bridge at `address`; returns its interface there."""
        inside, port = self._veth(namespace, self.internet, tag)
        self._ports[namespace] = port
        sh("ip", "-n", self.internet, "link", "set", port, "master", "br0")
        sh("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
        return inside

    def start(self) -> "NatTopology":
        try:
            self.internet = self._ns("net")
            sh("ip", "-n", self.internet, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.internet, "link", "set", "br0", "up")
            for name, octet in self.public_hosts.items():
                namespace = self._ns(name)
                self._to_internet(namespace, f"p{octet}", f"{INTERNET}.{octet}")
                self.hosts[name] = Host(name, namespace, f"{INTERNET}.{octet}", behind_nat=False)
            for n in range(1, self.routers + 1):
                self._add_router(n)
        except BaseException:
            self.shutdown()
            raise
        return self

    def _add_router(self, n: int) -> None:
        router, host = self._ns(f"r{n}"), self._ns(f"h{n}")
        wan = self._to_internet(router, f"w{n}", f"{INTERNET}.{ROUTER_WAN_BASE + n}")
        lan, inside = self._veth(router, host, f"l{n}")
        lan_net = f"10.99.{n}"
        sh("ip", "-n", router, "addr", "add", f"{lan_net}.1/24", "dev", lan)
        sh("ip", "-n", host, "addr", "add", f"{lan_net}.10/24", "dev", inside)
        sh("ip", "-n", host, "route", "add", "default", "via", f"{lan_net}.1")
        sh("ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        ipt = ("ip", "netns", "exec", router, "iptables")
        sh(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE")
        # a home router: replies come back in, nothing else does
        sh(*ipt, "-A", "FORWARD", "-i", lan, "-o", wan, "-j", "ACCEPT")
        sh(*ipt, "-A", "FORWARD", "-i", wan, "-o", lan, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
           "-j", "ACCEPT")
        sh(*ipt, "-P", "FORWARD", "DROP")
        self.hosts[f"h{n}"] = Host(f"h{n}", host, f"{lan_net}.10", behind_nat=True)

    def cut(self, host: str) -> None:
        """Unplug `host` (or its router) from the internet without telling anyone: its port on the bridge goes
        down, so packets to and from it vanish, and no connection is reset (a lost Wi-Fi, a cable pulled)."""
        router = f"r{host[1:]}" if self.hosts[host].behind_nat else host
        sh("ip", "-n", self.internet, "link", "set", self._ports[f"{self.prefix}-{router}"], "down")

    # ---- processes -------------------------------------------------------------------------------------
    def exec_prefix(self, host: str) -> tuple[str, ...]:
        """The command prefix that runs a program inside `host`'s namespace."""
        return ("ip", "netns", "exec", self.hosts[host].namespace)

    def adopt(self, proc: NodeProcess) -> NodeProcess:
        """Stop `proc` (started by the caller inside one of our namespaces) at shutdown, with ours."""
        self.procs.append(proc)
        return proc

    def spawn(self, host: str, command: Sequence[str], name: str, args: Sequence[str] = (), *, wait: bool = True,
              env: Mapping[str, str] | None = None) -> NodeProcess:
        """`p2pc <command> --data-dir ROOT/NAME ... ARGS` inside `host`'s namespace (its own process group)."""
        proc = NodeProcess(command, self.root / name, args, env=env, prefix=self.exec_prefix(host))
        return self.adopt(proc).start(wait=wait)

    def p2pc(self, host: str, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        """Run the `p2pc` CLI inside `host`'s namespace (a node's control API listens on that namespace's
        127.0.0.1, which the root namespace does not reach)."""
        return subprocess.run([*self.exec_prefix(host), sys.executable, "-m",
                               "p2pcompute.cli.main", *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def shutdown(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):  # one stuck process must not keep the others or namespaces alive
                proc.stop(timeout=10)
        self.procs.clear()
        for namespace in reversed(self._namespaces):
            # anything still running in a namespace we made is ours (a process group that escaped a stop, p2pd
            # of a killed node): the namespace would outlive `ip netns del` while it runs
            for pid in sh("ip", "netns", "pids", namespace, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", namespace, check=False)
        self._namespaces.clear()

    def __enter__(self) -> "NatTopology":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
