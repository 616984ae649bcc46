"""shoal across hosts: a head and schedulers, each in a namespace of :class:`Hosts`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from shoal.testing.cluster import Component, ProcessCluster
from shoal.testing.netns.hosts import Host, Hosts


class NsComponent(Component):
    """A head or scheduler process inside a host's namespace, bound to the host's address."""

    def __init__(self, name: str, args: list[str], state: Path, env: Mapping[str, str], host: Host) -> None:
        super().__init__(name, args, state, env)
        self.host = host

    def start(self, keys: tuple[str, ...]) -> None:
        # As Component.start, with the command run through ``ip netns exec``.
        self.state.mkdir(parents=True, exist_ok=True)
        ep = self.state / "endpoints.json"
        if ep.exists():
            ep.unlink()
        bind = ["--host", self.host.address, "--advertise-host", self.host.address]
        with open(self.log, "ab") as out:
            self.proc = self.host.popen(
                [sys.executable, "-m", "shoal.cli", *self.args, *bind, "--state", str(self.state)],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        self._wait_started(keys)


class NetCluster(ProcessCluster):
    """A head on ``hosts[0]`` and a scheduler on each further host, every one a process in
    its host's namespace, bound to its address (``--host`` and ``--advertise-host``), so
    that all traffic between head, schedulers and replicas crosses the test network.

    Schedulers have stable ids ``sched-<i>`` (``i`` from 0), so a restarted one rejoins
    as itself. ``close()`` undoes every fault first, then kills everything (the state
    folders are throwaway; ``Hosts.close`` kills whatever is left in the namespaces).
    """

    def __init__(
        self,
        hosts: Hosts,
        root: Path,
        *,
        env: Mapping[str, str] | None = None,
        scheduler_args: list[list[str]] | None = None,
    ) -> None:
        if not hosts.gateway:
            raise ValueError("NetCluster drives the cluster from the test process: it needs the gateway")
        # Plaintext between the namespaces: a private test network (no --tls-dir).
        super().__init__(
            root,
            schedulers=len(hosts) - 1,
            env={"SHOAL_INSECURE": "1", **(env or {})},
            scheduler_args=scheduler_args,
        )
        self.hosts = hosts

    async def __aenter__(self) -> NetCluster:
        await super().__aenter__()
        await self.wait_registered()
        return self

    async def wait_registered(self, timeout_s: float = 30.0) -> None:
        """Wait until the head lists every scheduler ALIVE (they register after they report
        their endpoints): a deployment made before that is placed on the first ones only."""
        ids = {f"sched-{i}" for i in range(len(self.schedulers))}
        await self.wait_for(
            lambda s: ids <= {x["id"] for x in s["schedulers"] if x["state"] == "ALIVE"},
            timeout_s=timeout_s,
            what=f"schedulers {sorted(ids)} registered",
        )

    def start(self) -> None:
        head_host = self.hosts[0]
        self.head = NsComponent(
            "head", ["head", "--port", "0", "--http-port", "0"], self.root / "head", self.env, head_host
        )
        self.head.start(("head", "head_http"))
        for i in range(self.n_schedulers):
            self.add_scheduler(self.scheduler_args[i] if i < len(self.scheduler_args) else [])

    def add_scheduler(self, extra: list[str] | None = None) -> Component:
        i = len(self.schedulers)
        comp = NsComponent(
            f"scheduler{i}",
            [
                "--head",
                self.head_address,
                "scheduler",
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--scheduler-id",
                f"sched-{i}",
                *(extra or []),
            ],
            self.root / f"scheduler{i}",
            self.env,
            self.hosts[i + 1],
        )
        comp.start(("scheduler", "scheduler_http"))
        self.schedulers.append(comp)
        return comp

    def restart_scheduler(self, i: int) -> None:
        """Start scheduler ``i`` again (after it was killed) with its id, on its ports."""
        comp = self.schedulers[i]
        port = comp.endpoints["scheduler"].rsplit(":", 1)[1]
        http = comp.endpoints["scheduler_http"].rsplit(":", 1)[1]
        args = list(comp.args)
        args[args.index("--grpc-port") + 1] = port
        args[args.index("--http-port") + 1] = http
        comp.args = args
        comp.start(("scheduler", "scheduler_http"))

    def scheduler_host(self, i: int) -> Host:
        return self.hosts[i + 1]

    @property
    def head_host(self) -> Host:
        return self.hosts[0]

    @property
    def head_http(self) -> str:
        assert self.head is not None
        return self.head.endpoints["head_http"]

    async def close(self) -> None:
        self.hosts.calm()
        if self._client is not None:
            await self._client.close()
            self._client = None
        for comp in [*self.schedulers, *([self.head] if self.head else [])]:
            comp.kill_all()
        for pid in self._pids_seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
