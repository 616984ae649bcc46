"""``shoal logs DEPLOYMENT --follow`` against a real cluster: the replicas a deployment gets
while it is followed show up too (the README pairs it with scaling and killing replicas), and
the command ends once the deployment is deleted and its replicas' streams have ended."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(90)


async def test_follow_prints_the_replicas_a_deployment_gets_later(tmp_path: Path, examples_dir: Path) -> None:
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(
            {
                "name": "echo",
                "backend": "python",
                "model": "echo:Echo",
                "base_dir": str(examples_dir),
                "replicas": 1,
                "resources": {"cpus": 0.1},
            }
        )
        [first] = await cluster.wait_ready("echo", 1)
        follow = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "shoal.cli", "--head", cluster.head_address, "logs", "echo", "-f"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cluster.env,
        )
        lines: list[str] = []

        async def line_of(rid: str) -> str:
            """The first line printed for replica ``rid`` that says it loaded."""
            assert follow.stdout is not None
            while True:
                raw = await follow.stdout.readline()
                if not raw:
                    assert follow.stderr is not None
                    raise AssertionError(f"logs -f ended: {(await follow.stderr.read()).decode()}")
                line = raw.decode()
                lines.append(line)
                if line.startswith(f"{rid} | ") and "loaded" in line:
                    return line

        try:
            await asyncio.wait_for(line_of(first["id"]), 20)
            await cluster.client.scale("echo", 2)
            replicas = await cluster.wait_ready("echo", 2)
            [new] = [r["id"] for r in replicas if r["id"] != first["id"]]
            # The replica started after the command did, printed from the start of its log.
            try:
                await asyncio.wait_for(line_of(new), 20)
            except TimeoutError:
                raise AssertionError(f"no line of the new replica {new} in:\n{''.join(lines)}") from None
            assert follow.returncode is None  # still following
            # Deleted: once every replica's stream has ended, so does the command.
            await cluster.client.delete("echo")
            assert follow.stdout is not None
            await asyncio.wait_for(follow.stdout.read(), 30)
            assert await asyncio.wait_for(follow.wait(), 10) == 0
        finally:
            if follow.returncode is None:
                follow.kill()
            await follow.wait()


async def shoal(cluster: ProcessCluster, *args: str, token: str = "") -> str:
    """Run the CLI against the cluster with ``token``; its stdout (it must succeed)."""
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "shoal.cli", "--head", cluster.head_address, *args],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**cluster.env, "SHOAL_TOKEN": token},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out + err).decode()
    return out.decode()


async def test_a_follow_ends_when_its_token_is_revoked(tmp_path: Path, examples_dir: Path) -> None:
    """A follow has no end of its own: one went on printing the replica's lines for as long
    as it ran after its token was revoked. Now it ends, UNAUTHENTICATED."""
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(
            {
                "name": "echo",
                "backend": "python",
                "model": "echo:Echo",
                "base_dir": str(examples_dir),
                "resources": {"cpus": 0.1},
            }
        )
        [replica] = await cluster.wait_ready("echo", 1)
        admin = (await shoal(cluster, "token", "create", "--role", "admin", "--name", "ops")).split()[-1]
        made = await shoal(cluster, "token", "create", "--role", "read", "--name", "r", token=admin)
        reader = made.split()[-1]
        follow = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "shoal.cli", "--head", cluster.head_address, "logs", replica["id"], "-f"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**cluster.env, "SHOAL_TOKEN": reader},
        )
        try:
            assert follow.stdout is not None and follow.stderr is not None
            first = await asyncio.wait_for(follow.stdout.readline(), 20)  # it follows
            assert first, (await follow.stderr.read()).decode()
            await shoal(cluster, "token", "revoke", "r", token=admin)
            out, err = await asyncio.wait_for(follow.communicate(), 30)
            assert follow.returncode == 1, (out + err).decode()
            assert "ReadLog: the token was revoked" in err.decode()
        finally:
            if follow.returncode is None:
                follow.kill()
            await follow.wait()


@pytest.mark.parametrize(
    ("sig", "says"),
    [
        (signal.SIGSTOP, "is DEAD: its log cannot be followed now"),
        (signal.SIGKILL, "stopped answering: its log cannot be followed now"),
    ],
    ids=["hung", "killed"],
)
async def test_a_follow_ends_when_the_replicas_scheduler_is_declared_dead(
    tmp_path: Path, examples_dir: Path, sig: signal.Signals, says: str
) -> None:
    """A scheduler that hangs (stopped, as a machine that stops answering; its connection
    stays open): the follow of its replica went on after the head declared it dead, for as
    long as the client waited. Now it ends, UNAVAILABLE, naming the scheduler. One killed
    (its connection closed) ended in gRPC's words, "Socket closed", naming no scheduler."""
    async with ProcessCluster(tmp_path) as cluster:
        await cluster.deploy(
            {
                "name": "echo",
                "backend": "python",
                "model": "echo:Echo",
                "base_dir": str(examples_dir),
                "resources": {"cpus": 0.1},
            }
        )
        [replica] = await cluster.wait_ready("echo", 1)
        follow = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "shoal.cli", "--head", cluster.head_address, "logs", replica["id"], "-f"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cluster.env,
        )
        try:
            assert follow.stdout is not None and follow.stderr is not None
            first = await asyncio.wait_for(follow.stdout.readline(), 20)  # it follows
            assert first, (await follow.stderr.read()).decode()
            cluster.schedulers[0].signal(sig)
            out, err = await asyncio.wait_for(follow.communicate(), 30)
            assert follow.returncode == 1, (out + err).decode()
            assert f"of replica {replica['id']!r} {says}" in err.decode()
        finally:
            if sig == signal.SIGSTOP:
                cluster.schedulers[0].signal(signal.SIGCONT)
            if follow.returncode is None:
                follow.kill()
            await follow.wait()
