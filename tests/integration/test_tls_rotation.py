"""Certificates renewed on disk while the cluster runs (docs/security.md, "Certificate
rotation"): real processes with mutual TLS, their files replaced under them. A new
connection meets the new certificate on every port (the head's gRPC and HTTPS, the
scheduler's gRPC and HTTPS, served by two ingress processes, and its control port), the
connections and clients already open go on, the expiry gauge follows, and files that fail
their checks leave the certificate before serving."""

from __future__ import annotations

import asyncio
import datetime
import re
import shutil
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from shoal import certs
from shoal.api import AsyncClient
from shoal.config import Settings
from shoal.testing.cluster import ProcessCluster

pytestmark = pytest.mark.timeout(120)


def peer_certificate(address: str, tls: Path) -> x509.Certificate:
    """The certificate a new TLS connection to ``address`` meets, with the cluster's client
    certificate presented (the gRPC ports require one)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    context.check_hostname = False  # shoal's names, not the address: verified against the CA
    context.load_cert_chain(tls / "client.crt", tls / "client.key")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as raw:
        with context.wrap_socket(raw) as conn:
            der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def serials(addresses: list[str], tls: Path, each: int = 1) -> set[int]:
    """The serials new connections to ``addresses`` meet (``each`` connections to each)."""
    found = set()
    for address in addresses:
        for _ in range(each):
            cert = await asyncio.to_thread(peer_certificate, address, tls)
            found.add(cert.serial_number)
    return found


async def until(check: object, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.2)


async def expiry_gauge(url: str, tls: Path, role: str) -> float:
    async with httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=str(tls / "ca.crt")), timeout=10
    ) as web:
        page = (await web.get(url)).text
    found = re.search(rf'^shoal_tls_cert_expiry_timestamp_seconds{{role="{role}"}} (\S+)$', page, re.M)
    assert found, page[-2000:]
    return float(found.group(1))


def serial_of(tls: Path, role: str) -> int:
    return x509.load_pem_x509_certificate((tls / f"{role}.crt").read_bytes()).serial_number


async def test_renewed_certificates_serve_new_connections_without_a_restart(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    certs.init(tls)
    env = {"SHOAL_TLS_DIR": str(tls)}
    async with ProcessCluster(
        tmp_path / "cluster", env=env, scheduler_args=[["--ingress-workers", "2"]]
    ) as cluster:
        assert cluster.head is not None
        head, head_web = cluster.head.endpoints["head"], cluster.head.endpoints["head_http"]
        sched = cluster.schedulers[0].endpoints
        head_ports = [head, head_web]
        scheduler_ports = [sched["scheduler"], sched["scheduler_http"], sched["scheduler_control"]]
        old_head, old_scheduler = serial_of(tls, "head"), serial_of(tls, "scheduler")
        assert await serials(head_ports, tls) == {old_head}
        assert await serials(scheduler_ports, tls, each=4) == {old_scheduler}

        # A client connected before the renewal.
        client = AsyncClient(head, settings=Settings(head_address=head, tls_dir=str(tls), rpc_timeout_s=5))
        try:
            assert [s.id for s in (await client.status()).schedulers]
            # So that the scheduler's HTTPS port, each ingress process's, has its TLS context.
            head_metrics = f"https://{head_web}/metrics"
            scheduler_metrics = f"https://{sched['scheduler_http']}/metrics"
            old_end = certs.check(tls, "head").timestamp()
            assert await expiry_gauge(head_metrics, tls, "head") == pytest.approx(old_end)

            certs.renew(tls, ("head", "scheduler"), days=100)
            new_head, new_scheduler = serial_of(tls, "head"), serial_of(tls, "scheduler")
            new_end = certs.check(tls, "head").timestamp()
            assert abs(new_end - (time.time() + 100 * 86400)) < 600

            async def renewed() -> bool:
                return await serials(head_ports, tls) == {new_head} and await serials(
                    scheduler_ports, tls, each=4
                ) == {new_scheduler}

            await until(renewed)
            # The client made before goes on, on its connection; the scheduler stays in touch
            # with the head (its link, made before, reconnects as it needs).
            status = await client.status()
            assert [s.state for s in status.schedulers] == ["ALIVE"]
            assert await expiry_gauge(head_metrics, tls, "head") == pytest.approx(new_end)
            assert await expiry_gauge(scheduler_metrics, tls, "scheduler") == pytest.approx(
                certs.check(tls, "scheduler").timestamp()
            )
            log = cluster.head.log.read_text()
            assert log.count("took the renewed head certificate") == 1, log[-3000:]
            day = datetime.datetime.fromtimestamp(new_end, datetime.UTC)
            assert f"valid until {day:%Y-%m-%d %H:%M} UTC" in log

            # Bad files: a key that is not the certificate's, then one that ran out. The
            # renewed certificate keeps serving, and the log says what is wrong, once.
            before = (tls / "head.key").read_bytes()
            shutil.copy(tls / "client.key", tls / "head.key")

            async def warned(what: str) -> bool:
                # The files are looked at as connections come (at most once a second).
                assert await serials(head_ports, tls) == {new_head}
                return what in cluster.head.log.read_text()  # type: ignore[union-attr]

            await until(lambda: warned(f"{tls / 'head.key'} is not the key of {tls / 'head.crt'}"))
            assert await serials(head_ports, tls, each=2) == {new_head}
            (tls / "head.key").write_bytes(before)
            certs.renew(tls, ("head",), days=-1)
            await until(lambda: warned(f"{tls / 'head.crt'} expired on "))
            assert await serials(head_ports, tls, each=2) == {new_head}
            assert (await client.status()).schedulers
            log = cluster.head.log.read_text()
            assert log.count("changed but are not taken") == 2, log[-3000:]
            assert "still serving the certificate read before" in log
            assert await expiry_gauge(head_metrics, tls, "head") == pytest.approx(new_end)

            # Good files again: taken.
            certs.renew(tls, ("head",), days=50)
            last = serial_of(tls, "head")

            async def taken() -> bool:
                return await serials(head_ports, tls) == {last}

            await until(taken)
        finally:
            await client.close()
