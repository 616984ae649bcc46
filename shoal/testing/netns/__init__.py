"""Several hosts on one machine: Linux network namespaces on a private bridge, and faults
injected between them. Needs root and ``ip`` (iproute2); partitions need ``iptables``.

    with Hosts(3) as hosts:                       # head, two schedulers
        async with NetCluster(hosts, tmp_path) as cluster:
            await cluster.deploy(spec)
            hosts.partition(hosts[1], hosts[0])   # scheduler 0 cannot reach the head
            hosts.heal(hosts[1], hosts[0])

The network. Every host is a namespace ``shoal-<pid>-<n>-h<i>`` with loopback and one
``eth0`` at ``10.77.<run>.<i+1>/24``; the other end of each ``eth0`` veth sits in a
namespace of its own (``shoal-<pid>-<n>-br``) and is enslaved to the bridge ``br0``
there. Nothing of it lives in the machine's own namespace except, with ``gateway=True``
(the default), one more veth whose root end has ``10.77.<run>.254/24``: the test process
reaches the hosts through it like a client on the same network. The root namespace
forwards nothing (its ``ip_forward`` is left alone) and gets no firewall rule, so the
machine's real interfaces are never crossed. ``<run>`` comes from the pid and skips
subnets the root namespace already routes, so parallel runs do not collide.

Faults: :meth:`Hosts.partition` drops, in both namespaces, every packet arriving from the
other host (a silent partition, as a cut cable: no RST, no ICMP); :meth:`Hosts.delay`
adds latency and loss on a host's outgoing packets with ``tc netem`` or, on kernels
built without netem, an NFQUEUE rule served by a small verdict loop in that namespace
(``python -m shoal.testing.netns nfqueue``); :meth:`Hosts.pause` stops every process
in a namespace with SIGSTOP (a host that hangs: its sockets stay open).

:meth:`Hosts.close` kills every process in every namespace (replicas included, wherever
they were started from) and deletes the namespaces, which takes their links, rules and
qdiscs with them. Namespaces left by a run that was killed are swept by the next one.

The package: :mod:`.hosts` builds the namespaces and injects the faults, :mod:`.cluster`
runs shoal's processes across them, :mod:`.nfqueue` is the verdict loop behind
:meth:`Hosts.delay` on kernels without netem.
"""

from shoal.testing.netns.cluster import NetCluster, NsComponent
from shoal.testing.netns.hosts import Host, Hosts, NetnsError, sweep_stale, unavailable_reason

__all__ = ["Host", "Hosts", "NetCluster", "NetnsError", "NsComponent", "sweep_stale", "unavailable_reason"]
