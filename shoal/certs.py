"""A cluster's certificates: ``shoal certs init DIR`` and where components find them.

``DIR`` holds one cluster CA (``ca.crt``, ``ca.key``) and a key pair per role, each signed
by that CA::

    ca.crt  ca.key                     the cluster CA (keep ca.key off the cluster's machines)
    head.crt  head.key                 the head: gRPC control API, REST API, dashboard
    scheduler.crt  scheduler.key       schedulers: ingress, calls to the head and to replicas
    replica.crt  replica.key           replicas: calls from and to their scheduler
    client.crt  client.key             the CLI and other clients of the gRPC APIs

Every certificate names its role in its common name (``shoal-<role>``), which servers
check for calls only one role may make (RegisterScheduler from a scheduler, CreateReplica
from the head, ...). Certificates serve as both TLS server and client certificates.

Names. Each certificate's subject alternative names are ``localhost``, ``127.0.0.1``,
``::1``, the ``--host`` names and addresses given, :data:`CLUSTER_NAME`, and its role's
name under it (:func:`role_name`: ``head.shoal.cluster``, ...). shoal's own clients verify
the peer against the role they expect to reach (``grpc.ssl_target_name_override``), not
against the address they dial, so any address works (a scheduler that moves, a NAT) while
trust stays pinned to the cluster CA, the only root a component trusts, and a server
holding another role's key (every scheduler machine has ``replica.key``) cannot pose as
the head. Clients that verify the address (tritonclient, curl, browsers) need the address
among the ``--host`` values.

Private keys are written with mode 0600 and the folder with 0700.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.errors import AlreadyExists, InvalidArgument

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CLUSTER_NAME = "shoal.cluster"
"""A DNS name in every certificate, which shoal's clients verify instead of the address dialled."""

ROLES = ("head", "scheduler", "replica", "client")
PEER_ROLES = ("head", "scheduler", "replica")
"""The roles whose certificates peers check by name (:func:`common_name`, :func:`role_name`)."""
VALID_DAYS = 825


@dataclass(frozen=True)
class Files:
    ca: Path
    cert: Path
    key: Path


def files(tls_dir: str | Path, role: str) -> Files:
    """Where ``role``'s certificate, key and the CA certificate are in ``tls_dir``. Raises
    InvalidArgument naming the file that is missing."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    folder = Path(tls_dir)
    out = Files(folder / "ca.crt", folder / f"{role}.crt", folder / f"{role}.key")
    for path in (out.ca, out.cert, out.key):
        if not path.is_file():
            raise InvalidArgument(
                f"TLS folder {str(folder)!r} has no {path.name}: create the cluster's certificates "
                f"with 'shoal certs init {folder}'"
            )
    return out


def read(tls_dir: str | Path, role: str) -> tuple[bytes, bytes, bytes]:
    """(CA certificate, ``role``'s certificate, ``role``'s key) as PEM bytes."""
    f = files(tls_dir, role)
    try:
        return f.ca.read_bytes(), f.cert.read_bytes(), f.key.read_bytes()
    except OSError as err:
        raise InvalidArgument(f"cannot read {err.filename}: {err.strerror}") from None


EXPIRY_WARNING_DAYS = 30
"""A component that starts with a certificate this close to its end says so."""


def check(tls_dir: str | Path, role: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """Check ``role``'s files in ``tls_dir`` as a component about to serve with them: each
    can be read and parsed, the key is the certificate's, the certificate was signed by
    ``ca.crt`` (directly, or through the other certificates of its file), and both
    certificates are valid ``now``. Returns when the first of them runs out. Raises
    InvalidArgument naming the file and what is wrong with it.

    Before, only the files' presence was checked: a key that was not the certificate's
    failed as "cannot listen on 127.0.0.1:8470: Failed to bind", and a certificate from
    another CA, or one past its end, served, and every peer failed its handshakes."""
    f = files(tls_dir, role)
    return check_pem(f, *read(tls_dir, role), now)[0]


def check_pem(
    f: Files,
    ca_pem: bytes,
    cert_pem: bytes,
    key_pem: bytes,
    now: datetime.datetime | None = None,
    remake: str = "",
) -> tuple[datetime.datetime, x509.Certificate]:
    """:func:`check` of the files' bytes (read once, so that what is checked is what
    serves); also returns the certificate. ``remake``: what to do about bad files, said
    after each problem (default: make the cluster's certificates again)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    remake = remake or f"make the cluster's certificates again with 'shoal certs init --force {f.ca.parent}'"
    try:
        roots = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise InvalidArgument(f"{f.ca} holds no PEM certificate: {remake}") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise InvalidArgument(f"{f.cert} holds no PEM certificate: {remake}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:  # TypeError: a key that needs a password
        raise InvalidArgument(f"{f.key} holds no private key shoal can use ({err}): {remake}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise InvalidArgument(
            f"{f.key} is not the key of {f.cert} (the files come from different 'shoal certs init' "
            f"runs?): copy both from one, or {remake}"
        )

    role = f.cert.stem
    if role in PEER_ROLES:
        from cryptography.x509.oid import NameOID

        held = [str(a.value) for a in chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if common_name(role) not in held:
            # Peers take a caller's role from its common name: another role's certificate in
            # this place had every call refused PERMISSION_DENIED (a scheduler holding the
            # client's retried its registration for good), and its server failed every
            # client's name check.
            raise InvalidArgument(
                f"{f.cert} is the certificate of {', '.join(held) or 'no role'}, not of the {role} "
                f"(its common name must be {common_name(role)}): every peer would refuse it; copy "
                f"{role}.crt and {role}.key from the folder 'shoal certs init' made, or {remake}"
            )

    def signed(cert: x509.Certificate, by: x509.Certificate) -> bool:
        try:
            cert.verify_directly_issued_by(by)
            return True
        except (ValueError, TypeError, InvalidSignature):
            return False

    if not any(c == r or signed(c, r) for c in chain for r in roots):
        raise InvalidArgument(
            f"{f.cert} was not signed by the cluster CA in {f.ca} (issuer "
            f"{chain[0].issuer.rfc4514_string()!r}; another cluster's certificates?): every peer "
            f"would refuse it: copy the cluster's files, or {remake}"
        )
    now = now or datetime.datetime.now(datetime.UTC)
    for path, cert in ((f.cert, chain[0]), (f.ca, roots[0])):
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if now < start:
            raise InvalidArgument(
                f"{path} is valid only from {start:%Y-%m-%d %H:%M} UTC (this machine's clock says "
                f"{now:%Y-%m-%d %H:%M}): check the clock"
            )
        if now > end:
            raise InvalidArgument(f"{path} expired on {end:%Y-%m-%d %H:%M} UTC: {remake}")
    return min(roots[0].not_valid_after_utc, chain[0].not_valid_after_utc), chain[0]


def names(tls_dir: str | Path, role: str) -> list[str]:
    """The DNS names and addresses ``role``'s certificate is valid for (its subject
    alternative names), as clients that check the address they dial compare them."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificates(files(tls_dir, role).cert.read_bytes())[0]
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *alt.get_values_for_type(x509.DNSName),
        *(str(a) for a in alt.get_values_for_type(x509.IPAddress)),
    ]


def names_host(names: list[str], host: str) -> bool:
    """Whether a certificate valid for ``names`` is valid for ``host`` (an address or a
    DNS name; ``*.`` names match one label)."""
    host = host.strip("[]").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for name in names:
        if address is not None:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(name) == address:
                    return True
            continue
        name = name.lower()
        if name == host or (name.startswith("*.") and host.partition(".")[2] == name[2:]):
            return True
    return False


def common_name(role: str) -> str:
    return f"shoal-{role}"


def role_name(role: str) -> str:
    """The DNS name only ``role``'s certificate carries, which clients verify to know they
    reach that role."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return f"{role}.{CLUSTER_NAME}"


def _name(cn: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # also when the file existed with other bits


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _alt_names(role: str, hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    from cryptography import x509

    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in (role_name(role), CLUSTER_NAME, "localhost", "127.0.0.1", "::1", *hosts):
        host = host.strip().strip("[]")
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def init(tls_dir: str | Path, hosts: tuple[str, ...] = (), *, force: bool = False) -> list[Path]:
    """Create a cluster CA and one certificate per role in ``tls_dir``; returns the files written.

    Refuses (AlreadyExists) when the folder already holds a CA, unless ``force``.
    """
    # Imported here: components read certificates, only this command makes them.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder = Path(tls_dir)
    if (folder / "ca.crt").exists() and not force:
        raise AlreadyExists(f"{folder} already holds a cluster CA; use --force to replace every file")
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("shoal cluster CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    written = [folder / "ca.crt", folder / "ca.key"]
    _write(written[0], ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(written[1], _key_pem(ca_key), 0o600)

    for role in ROLES:
        alt = x509.SubjectAlternativeName(_alt_names(role, hosts))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name(role)))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(alt, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        crt, pem = folder / f"{role}.crt", folder / f"{role}.key"
        _write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(pem, _key_pem(key), 0o600)
        written += [crt, pem]
    return written


def renew(
    tls_dir: str | Path,
    roles: tuple[str, ...] = ROLES,
    *,
    days: float = VALID_DAYS,
    hosts: tuple[str, ...] = (),
) -> list[Path]:
    """Sign each of ``roles``' certificates again with the folder's CA (``ca.key`` needed),
    with a new serial and valid from now for ``days`` (no longer than the CA), keeping its
    key and names (``hosts`` given: its names become those, as ``init`` makes them). Each
    certificate is written to a file beside it and renamed over it, so a component reading
    the folder (:mod:`shoal.certwatch`) sees the old file or the new one, never part of one;
    the key, unchanged, stays the certificate's. Returns the files written. Raises
    InvalidArgument naming a file that is missing or unusable."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(tls_dir)
    try:
        ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    except OSError as err:
        raise InvalidArgument(
            f"cannot read {err.filename}: {err.strerror} (renewing needs the cluster CA's ca.crt and ca.key)"
        ) from None
    except (ValueError, TypeError) as err:
        raise InvalidArgument(f"the cluster CA in {folder} cannot be used: {err}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(f"{folder / 'ca.key'} is not the elliptic-curve key 'shoal certs init' makes")
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(minutes=5)
    end = min(now + datetime.timedelta(days=days), ca.not_valid_after_utc)
    start = min(start, end - datetime.timedelta(minutes=1))  # days < 0: one that ran out (tests)
    written = []
    for role in roles:
        f = files(folder, role)
        old = x509.load_pem_x509_certificates(f.cert.read_bytes())[0]
        builder = (
            x509.CertificateBuilder()
            .subject_name(old.subject)
            .issuer_name(ca.subject)
            .public_key(old.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
        )
        for ext in old.extensions:
            value = ext.value
            if hosts and isinstance(value, x509.SubjectAlternativeName):
                value = x509.SubjectAlternativeName(_alt_names(role, hosts))
            builder = builder.add_extension(value, ext.critical)
        cert = builder.sign(ca_key, hashes.SHA256())
        fresh = f.cert.with_name(f".{f.cert.name}.new")
        _write(fresh, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        os.replace(fresh, f.cert)
        written.append(f.cert)
    return written
