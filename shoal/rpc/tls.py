"""TLS for gRPC: credentials from the cluster's certificate folder (``settings.tls_dir``),
and the rule that a cluster without TLS binds loopback only.

Servers ask for and verify a client certificate from the cluster CA
(``require_client_auth``); clients present their role's certificate and trust only the
cluster CA, verifying the server's name as the role they expect
(:func:`shoal.certs.role_name`) whatever address they dial (see ``shoal/certs.py`` and
``shoal.rpc.channels.open_channel``). Certificates renewed on disk serve new connections
without a restart (:mod:`shoal.certwatch`), a server's and a client's alike
(``shoal.rpc.channels.PeerChannel``).
"""

from __future__ import annotations

import datetime
import logging

import grpc

from shoal import certs, certwatch
from shoal.auth import is_loopback
from shoal.config import Settings
from shoal.errors import InvalidArgument

log = logging.getLogger("shoal")


def server_credentials(settings: Settings, role: str) -> grpc.ServerCredentials | None:
    """Mutual TLS with ``role``'s certificate, or None without TLS. Raises InvalidArgument.

    The certificate, key and CA are taken again when they change on disk
    (:mod:`shoal.certwatch`): gRPC asks on each new handshake, and new connections get the
    renewed files once they pass the checks of start-up; connections open keep theirs.
    One credentials object per ``add_secure_port`` (:func:`shoal.rpc.server.bind`): gRPC
    makes one TLS context per port from it, and the fetcher below tells each apart whether
    it has the current files; a second port on the same object fails to bind."""
    if not settings.tls_dir:
        return None
    watch = certwatch.watch(settings.tls_dir, role)
    first = watch.poll()
    handed = [first.generation]  # what this port's TLS context holds

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC, on one of its threads (taking the GIL), before each new handshake:
        # None keeps what the port has. Costs a clock read but once a second (certwatch).
        try:
            now = watch.poll()
            if now.generation == handed[0]:
                return None
            handed[0] = now.generation
            return _configuration(now)
        except Exception:
            log.exception("reading the %s certificate again failed; serving the one before", role)
            return None

    return grpc.dynamic_ssl_server_credentials(
        _configuration(first),
        fetch,  # type: ignore[arg-type]  # the stubs leave out the None gRPC documents
        require_client_authentication=True,
    )


def _configuration(m: certwatch.Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], root_certificates=m.ca)


def channel_credentials(settings: Settings, role: str) -> grpc.ChannelCredentials | None:
    """``role``'s client certificate and the cluster CA as the only root, or None without TLS.
    Raises InvalidArgument for a certificate that would fail every handshake
    (``certs.check``).

    The files are the ones :mod:`shoal.certwatch` took last. gRPC cannot change a channel's
    credentials, so a channel keeps these for as long as it lives, reconnections included:
    shoal's channels to peers are :class:`shoal.rpc.channels.PeerChannel`, which make a new
    channel when the files are renewed on disk."""
    if not settings.tls_dir:
        return None
    return material_credentials(certwatch.watch(settings.tls_dir, role).poll())


def material_credentials(m: certwatch.Material) -> grpc.ChannelCredentials:
    """Client credentials of ``m``: its certificate, and its CA as the only root."""
    return grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert)


def check_transport(settings: Settings, *roles: str) -> None:
    """Refuse to serve plaintext beyond this machine: a non-loopback ``host`` needs TLS
    (``tls_dir``) or ``insecure``. With TLS, check that ``roles``' certificates are there
    (fail at start-up, not at the first call): readable, the keys theirs, signed by the
    cluster CA, valid now; warn when one runs out within ``certs.EXPIRY_WARNING_DAYS``.
    Raises InvalidArgument saying how to fix it."""
    if settings.tls_dir:
        now = datetime.datetime.now(datetime.UTC)
        for role in roles:
            left = certs.check(settings.tls_dir, role, now) - now
            if left < datetime.timedelta(days=certs.EXPIRY_WARNING_DAYS):
                # Renewed files are taken without a restart (shoal.certwatch).
                log.warning(
                    "the %s certificate in %s runs out in %.1f days: renew it before then (shoal "
                    "certs renew %s, or your certificate manager): components take renewed files "
                    "without a restart",
                    role,
                    settings.tls_dir,
                    left.total_seconds() / 86400,
                    settings.tls_dir,
                )
            _check_names(settings, role)
        return
    if is_loopback(settings.host) or settings.insecure:
        return
    raise InvalidArgument(
        f"refusing to listen on {settings.host} in plaintext: give a certificate folder "
        "(--tls-dir, from 'shoal certs init DIR'), or --insecure (SHOAL_INSECURE=1) on a network "
        "you trust, or bind 127.0.0.1"
    )


_ANY_HOST = ("", "0.0.0.0", "::", "[::]")


def _check_names(settings: Settings, role: str) -> None:
    """Warn when the head's or a scheduler's certificate does not name the one host it
    listens on: shoal's own clients check role names, not addresses, and get on, but the
    clients of the ports users call (tritonclient, curl, browsers) check the address they
    dial and refuse the certificate. Not for a server on every interface: its users may
    dial any name (a Kubernetes Service's, not the pod's address it advertises)."""
    host = settings.host
    if role not in ("head", "scheduler") or host in _ANY_HOST:
        return
    names = certs.names(settings.tls_dir, role)
    if not certs.names_host(names, host):
        log.warning(
            "the %s certificate in %s does not name %s (it names %s): clients that dial that "
            "address and check it (tritonclient, curl, browsers) will refuse it; make the "
            "certificates again with it ('shoal certs init %s --force --host %s', every other "
            "--host too) and restart every component with them",
            role,
            settings.tls_dir,
            host,
            ", ".join(names),
            settings.tls_dir,
            host,
        )


def announce_transport(settings: Settings) -> None:
    """Say once, at start-up, how this process talks to the world."""
    if settings.tls_dir:
        log.info("mutual TLS on gRPC, HTTPS on HTTP (certificates in %s)", settings.tls_dir)
    elif settings.insecure and not is_loopback(settings.host):
        log.warning(
            "PLAINTEXT on %s (--insecure): anyone on this network can call every API; use --tls-dir",
            settings.host,
        )
    elif is_loopback(settings.host):
        log.info("plaintext on loopback (%s) only: no --tls-dir, so no other machine can join", settings.host)
    # Else nothing: check_transport refuses it, saying why (this said "plaintext on loopback
    # (0.0.0.0) only" just before that refusal).


def plaintext_peer(message: str) -> bool:
    """A failed call's message says this TLS client met a server that does not speak TLS."""
    return "WRONG_VERSION_NUMBER" in message


def handshake_failed(message: str) -> bool:
    """A failed call's message says the TLS handshake failed (the server answered, with a
    certificate this client does not trust, or asked for one it does not have)."""
    low = message.lower()
    return "handshake" in low or "certificate" in low or "ssl" in low


def tls_hint(message: str, tls: bool | None = None) -> str:
    """A failed call's message, with what to check when it was the TLS handshake. ``tls``
    False: the caller spoke plaintext, and a server that closes the connection before any
    answer (what a TLS server does to plaintext) may want TLS."""
    if tls is False and "Socket closed" in message:
        return f"{message} (if that server runs with TLS, give this process its --tls-dir too)"
    if plaintext_peer(message):
        return f"{message} (the server does not speak TLS: it runs without --tls-dir)"
    if "certificate has expired" in message:
        # Servers take renewed files for new connections (shoal.certwatch), and so do the
        # channels of clients (shoal.rpc.channels.PeerChannel).
        return (
            f"{message} (TLS handshake failed: the server's certificate has run out: renew it in "
            "the server's --tls-dir (shoal certs renew DIR): the server takes renewed files "
            "without a restart)"
        )
    if handshake_failed(message):
        return (
            f"{message} (TLS handshake failed: both sides need certificates from the same cluster CA "
            "in --tls-dir, and the server one of the role this client expects; certificates made "
            "before roles had names (no head.shoal.cluster) must be made again: "
            "shoal certs init --force)"
        )
    return message
