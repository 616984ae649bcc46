"""Certificates renewed on disk, taken without a restart (``shoal.certwatch``): what is
taken, what is refused and kept out, and how little a look at the files costs."""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from shoal import certs, certwatch
from shoal.errors import InvalidArgument

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def serial(folder: Path, role: str = "head") -> int:
    return x509.load_pem_x509_certificate((folder / f"{role}.crt").read_bytes()).serial_number


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    certs.init(tmp_path / "tls")
    return tmp_path / "tls"


def test_a_renewed_certificate_is_taken_once_and_logged_with_its_end(
    tls: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    watch = certwatch.load(tls, "head", clock=clock)
    first = watch.current
    assert first.generation == 0 and first.serial == serial(tls)
    certs.renew(tls, ("head",), days=10)
    with caplog.at_level(logging.INFO, logger="shoal"):
        assert watch.poll() is first  # within the second: the files are not even looked at
        assert watch.looks == 0
        clock.now += 1.0
        taken = watch.poll()
        clock.now += 1.0
        assert watch.poll() is taken  # unchanged since: not read again
    assert taken.generation == 1 and taken.serial == serial(tls) != first.serial
    assert taken.cert == (tls / "head.crt").read_bytes() and taken.key == first.key
    end = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=10)
    assert abs((taken.end - end).total_seconds()) < 60
    (line,) = [r for r in caplog.records if "took the renewed" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert f"head certificate in {tls}" in line.getMessage()
    assert f"valid until {taken.end:%Y-%m-%d %H:%M} UTC" in line.getMessage()
    assert watch.looks == 2


def test_files_touched_or_copied_again_unchanged_are_not_a_new_certificate(tls: Path) -> None:
    clock = Clock()
    watch = certwatch.load(tls, "head", clock=clock)
    first = watch.current
    shutil.copy(tls / "head.crt", tls / "copy")
    os.replace(tls / "copy", tls / "head.crt")
    clock.now += 1.0
    assert watch.poll() is first


def bad_then_good(
    tls: Path, caplog: pytest.LogCaptureFixture, spoil: str, fix: str, problem: str, hint: bool = True
) -> None:
    """Spoil the head's files (a shell command's worth of Python, ``spoil``), and see the
    certificate before keep serving with one WARNING naming ``problem``; then ``fix``, and
    see the new files taken."""
    clock = Clock()
    watch = certwatch.load(tls, "head", clock=clock)
    first = watch.current
    with caplog.at_level(logging.INFO, logger="shoal"):
        exec(spoil)
        for _ in range(3):  # looked at again and again: still refused, warned of once
            clock.now += 1.0
            assert watch.poll() is first
        clock.now += certwatch.RETRY_BAD_S  # checked again, quietly
        assert watch.poll() is first
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"the head certificate files in {tls} changed but are not taken: ")
    assert problem in warnings[0], warnings[0]
    # The remedy is to renew again, not to remake the CA the running certificate came from.
    if hint:  # a file that does not parse or check, rather than one missing
        assert (
            f"renew them with 'shoal certs renew {tls}'" in warnings[0] and "init --force" not in warnings[0]
        )
    assert (
        f"still serving the certificate read before (valid until {first.end:%Y-%m-%d %H:%M} UTC)"
        in warnings[0]
    )
    exec(fix)
    clock.now += 1.0
    assert watch.poll().generation == 1 and watch.current.serial == serial(tls) != first.serial


def test_a_key_that_is_not_the_certificates_is_refused(tls: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad_then_good(
        tls,
        caplog,
        "certs.renew(tls, ('head',)); shutil.copy(tls / 'head.key', tls / 'head.key.kept'); "
        "shutil.copy(tls / 'client.key', tls / 'head.key')",
        "shutil.copy(tls / 'head.key.kept', tls / 'head.key')",  # the renewed head.crt's key again
        f"{tls / 'head.key'} is not the key of {tls / 'head.crt'}",
    )


def test_another_roles_pair_is_refused(tls: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Key and certificate match and the CA signed them, but peers would take the head for a client.
    bad_then_good(
        tls,
        caplog,
        "certs.renew(tls, ('head',)); shutil.copy(tls / 'head.crt', tls / 'head.crt.kept'); "
        "shutil.copy(tls / 'head.key', tls / 'head.key.kept'); "
        "shutil.copy(tls / 'client.crt', tls / 'head.crt'); "
        "shutil.copy(tls / 'client.key', tls / 'head.key')",
        "shutil.copy(tls / 'head.key.kept', tls / 'head.key'); "
        "shutil.copy(tls / 'head.crt.kept', tls / 'head.crt')",
        f"{tls / 'head.crt'} is the certificate of shoal-client, not of the head",
    )


def test_an_expired_certificate_is_refused(tls: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad_then_good(
        tls,
        caplog,
        "certs.renew(tls, ('head',), days=-1)",
        "certs.renew(tls, ('head',), days=5)",
        f"{tls / 'head.crt'} expired on ",
    )


def test_a_file_caught_half_written_is_refused_until_it_is_whole(
    tls: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad_then_good(
        tls,
        caplog,
        "whole = (tls / 'head.crt').read_bytes(); certs.renew(tls, ('head',)); "
        "new = (tls / 'head.crt').read_bytes(); (tls / 'head.crt').write_bytes(new[: len(new) // 2])",
        "(tls / 'head.crt').write_bytes(new)",
        f"{tls / 'head.crt'} holds no PEM certificate",
    )


def test_a_missing_file_is_refused_until_it_is_back(tls: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad_then_good(
        tls,
        caplog,
        "certs.renew(tls, ('head',)); os.rename(tls / 'head.key', tls / 'away')",
        "os.rename(tls / 'away', tls / 'head.key')",
        "has no head.key",
        hint=False,
    )


def test_the_first_read_refuses_bad_files_as_start_up_does(tls: Path) -> None:
    shutil.copy(tls / "client.key", tls / "head.key")
    with pytest.raises(InvalidArgument, match="is not the key of"):
        certwatch.load(tls, "head")
    with pytest.raises(InvalidArgument, match="is not the key of"):
        certwatch.watch(tls, "head")


def test_one_watch_per_folder_and_role_in_a_process(tls: Path) -> None:
    a = certwatch.watch(tls, "scheduler")
    assert certwatch.watch(str(tls) + "/", "scheduler") is a
    assert certwatch.watch(tls, "replica") is not a


def test_renew_keeps_the_key_and_names_and_can_change_the_names(tls: Path) -> None:
    key = (tls / "scheduler.key").read_bytes()
    names = certs.names(tls, "scheduler")
    certs.renew(tls, ("scheduler",), days=30)
    assert (tls / "scheduler.key").read_bytes() == key and certs.names(tls, "scheduler") == names
    end = certs.check(tls, "scheduler")
    assert end - datetime.datetime.now(datetime.UTC) < datetime.timedelta(days=31)
    certs.renew(tls, ("scheduler",), hosts=("10.0.0.7",))
    assert "10.0.0.7" in certs.names(tls, "scheduler") and "scheduler.shoal.cluster" in certs.names(
        tls, "scheduler"
    )
    assert not list(tls.glob(".*"))  # no file left beside them
