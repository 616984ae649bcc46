"""``shoal deploy`` of a local model to a real head and scheduler (processes, gRPC): the
file is uploaded to the head's blob store, the spec names its hash, the scheduler fetches
it and serves it, though the file lies outside every folder models may come from. A file
over the head's limit, and a spec naming a blob the head lacks, are clear deploy errors."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import joblib
import numpy as np
import pytest
import pytest_asyncio

from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.testing.cluster import ProcessCluster

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProcessCluster]:
    root = tmp_path_factory.mktemp("blobs")
    allowed = root / "allowed"
    allowed.mkdir()
    env = {
        # Models may come only from an empty folder, and from what shoal deploy uploads.
        "SHOAL_ALLOWED_MODEL_DIRS": str(allowed),
        "SHOAL_ALLOWED_MODEL_URIS": "blob://",
        "SHOAL_MAX_BLOB_MB": "2",
    }
    async with ProcessCluster(root / "cluster", env=env) as c:
        yield c


async def shoal_deploy(cluster: ProcessCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "shoal.cli", "--head", cluster.head_address, "deploy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**cluster.env, "SHOAL_HEAD": ""},
    )


async def test_a_local_sklearn_model_is_uploaded_and_serves(
    cluster: ProcessCluster, examples_dir: Path, tmp_path: Path
) -> None:
    shutil.copy(examples_dir / "digits.joblib", tmp_path / "digits.joblib")
    (tmp_path / "digits.yaml").write_text(
        "name: digits\nbackend: sklearn\nmodel: digits.joblib\nresources: {cpus: 0.1}\n"
    )
    proc = await shoal_deploy(cluster, "--upload", str(tmp_path / "digits.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sha = hashlib.sha256((tmp_path / "digits.joblib").read_bytes()).hexdigest()
    assert f"uploaded {tmp_path / 'digits.joblib'} as sha256:{sha[:12]}" in proc.stdout

    (dep,) = [d for d in (await cluster.status())["deployments"] if d["name"] == "digits"]
    assert dep["spec"]["model"] == f"blob://sha256:{sha}/digits.joblib"
    assert (cluster.root / "head" / "blobs" / sha).read_bytes() == (tmp_path / "digits.joblib").read_bytes()
    model = joblib.load(tmp_path / "digits.joblib")
    rows = np.arange(128, dtype=np.float32).reshape(2, 64) % 17
    outputs, _ = await cluster.send("digits", {"input": rows})
    assert outputs["label"].tolist() == model.predict(rows).tolist()

    # Deploying the same file again sends nothing: the head has the blob.
    again = await shoal_deploy(cluster, "--upload", "--no-wait", str(tmp_path / "digits.yaml"))
    assert again.returncode == 0 and "unchanged" in again.stdout, again.stdout + again.stderr
    assert "uploading" not in again.stderr and f"the head has {tmp_path / 'digits.joblib'}" in again.stdout
    await cluster.client.delete("digits")


async def test_a_model_over_the_heads_limit_and_an_unknown_blob_are_clear_errors(
    cluster: ProcessCluster, tmp_path: Path
) -> None:
    (tmp_path / "big.joblib").write_bytes(b"\0" * (3 * 2**20))
    (tmp_path / "big.yaml").write_text("name: big\nbackend: sklearn\nmodel: big.joblib\n")
    proc = await shoal_deploy(cluster, "--upload", str(tmp_path / "big.yaml"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "big.joblib is 3.0 MB; the head takes blobs of at most 2 MB (setting max_blob_mb)" in proc.stderr
    assert "Traceback" not in proc.stderr

    unknown = "blob://sha256:" + "0" * 64 + "/m.joblib"
    (tmp_path / "unknown.yaml").write_text(f"name: unknown\nbackend: sklearn\nmodel: {unknown}\n")
    proc = await shoal_deploy(cluster, str(tmp_path / "unknown.yaml"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{unknown} names a blob this head does not have" in proc.stderr


async def test_a_head_that_would_refuse_the_blob_refuses_its_upload_before_the_bytes(
    examples_dir: Path, tmp_path: Path
) -> None:
    """With allowed_model_dirs and no ``blob://`` among the URIs, a spec naming an upload is
    refused; the upload used to be sent and kept all the same, the deploy refused after."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    env = {"SHOAL_ALLOWED_MODEL_DIRS": str(allowed)}
    async with ProcessCluster(tmp_path / "cluster", env=env) as strict:
        app = tmp_path / "app"
        app.mkdir()
        shutil.copy(examples_dir / "digits.joblib", app / "digits.joblib")
        (app / "digits.yaml").write_text("name: digits\nbackend: sklearn\nmodel: digits.joblib\n")
        proc = await shoal_deploy(strict, "--upload", str(app / "digits.yaml"))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert (
            f"this head takes no uploads: models come only from the folders {allowed} "
            "(setting allowed_model_dirs)" in proc.stderr
        )
        assert "Traceback" not in proc.stderr
        assert not [p for p in (strict.root / "head" / "blobs").glob("*") if p.is_file()]
        assert [d["name"] for d in (await strict.status())["deployments"]] == []


async def test_a_blob_damaged_on_the_heads_disk_is_deleted_and_a_new_upload_replaces_it(
    cluster: ProcessCluster, examples_dir: Path, tmp_path: Path
) -> None:
    """The head's copy changed on its disk (its size kept): it used to be served as it was,
    every fetch failing its hash check, and ``shoal deploy --upload`` of the good file sent
    nothing (the head said it had it). The head checks the hash as it serves the blob: it
    deletes the damaged copy, and the next upload sends the file again."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(examples_dir / "echo.py", app / "echo.py")
    (app / "salt.txt").write_text(str(tmp_path))  # a blob no scheduler's cache holds yet
    (tmp_path / "damaged.yaml").write_text(
        f"name: damaged\nbackend: python\nmodel: echo:Echo\nbase_dir: {app}\nreplicas: 0\n"
        "resources: {cpus: 0.1}\n"
    )
    proc = await shoal_deploy(cluster, "--upload", "--no-wait", str(tmp_path / "damaged.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (dep,) = [d for d in (await cluster.status())["deployments"] if d["name"] == "damaged"]
    blob = cluster.root / "head" / "blobs" / dep["spec"]["base_dir"].split(":")[2].split("/")[0]
    good = blob.read_bytes()
    blob.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))

    await cluster.client.scale("damaged", 1)  # its scheduler fetches it from the head
    await cluster.wait_for(lambda s: not blob.exists(), timeout_s=30, what="the damaged blob deleted")
    assert "is damaged (its bytes hash to sha256:" in (cluster.root / "head" / "head.log").read_text()

    proc = await shoal_deploy(cluster, "--upload", "--no-wait", str(tmp_path / "damaged.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"uploaded {app}/" in proc.stdout
    assert blob.read_bytes() == good
    await cluster.client.scale("damaged", 1)
    await cluster.wait_ready("damaged", 1)
    await cluster.client.delete("damaged")


async def test_an_upload_past_the_heads_total_of_blobs_is_refused(tmp_path: Path) -> None:
    """Each blob was bounded, their total was not: uploads filled the head's disk, and its
    state file with them. The refusal comes before a byte is sent (the CLI's Stat names the
    size): sent at the first chunk while the CLI still wrote the next, it reached the CLI
    now and then as INTERNAL "Internal error from Core" (1 CI run)."""
    env = {"SHOAL_MAX_BLOB_MB": "2", "SHOAL_MAX_BLOBS_MB": "2"}
    async with ProcessCluster(tmp_path / "cluster", schedulers=0, env=env) as small:
        outs = []
        for name in ("first", "second"):
            (tmp_path / f"{name}.joblib").write_bytes(name.encode() * (3 * 2**19 // len(name)))  # 1.5 MB
            (tmp_path / f"{name}.yaml").write_text(
                f"name: {name}\nbackend: sklearn\nmodel: {name}.joblib\nreplicas: 0\n"
            )
            outs.append(await shoal_deploy(small, "--upload", "--no-wait", str(tmp_path / f"{name}.yaml")))
        assert outs[0].returncode == 0, outs[0].stdout + outs[0].stderr
        assert outs[1].returncode == 1, outs[1].stdout + outs[1].stderr
        assert "would pass its limit of 2 MB (setting max_blobs_mb)" in outs[1].stderr
        assert "uploading" not in outs[1].stderr  # refused before its first chunk
        assert "Traceback" not in outs[1].stderr
        assert [d["name"] for d in (await small.status())["deployments"]] == ["first"]


async def test_an_upload_past_the_heads_number_of_blobs_is_refused(tmp_path: Path) -> None:
    """Their bytes were bounded, their number was not: uploads that announced a byte and
    sent none kept a file each under the head's ``<state>/blobs/partial``."""
    async with ProcessCluster(tmp_path / "cluster", schedulers=0, env={"SHOAL_MAX_BLOBS": "2"}) as small:

        async def announce(sha: str) -> pb.BlobStat:
            async def chunks() -> AsyncIterator[pb.BlobChunk]:
                yield pb.BlobChunk(sha256=sha, size=1)

            async with grpc.aio.insecure_channel(small.head_address) as channel:
                return await pbg.BlobStub(channel).Upload(chunks(), timeout=10)

        for sha in ("1" * 64, "2" * 64):
            assert (await announce(sha)).have == 0
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await announce("3" * 64)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (refused.value.details() or "").startswith(
            "the head holds 2 blobs (whole, and uploads in progress or dropped), its limit "
            "(setting max_blobs)"
        )
        assert (await announce("1" * 64)).have == 0  # one it holds is taken as ever

        (tmp_path / "m.joblib").write_bytes(b"model")
        (tmp_path / "m.yaml").write_text("name: m\nbackend: sklearn\nmodel: m.joblib\nreplicas: 0\n")
        out = await shoal_deploy(small, "--upload", "--no-wait", str(tmp_path / "m.yaml"))
        assert out.returncode == 1, out.stdout + out.stderr
        assert "its limit (setting max_blobs)" in out.stderr and "Traceback" not in out.stderr
        assert "uploading" not in out.stderr  # refused before its first chunk
        partial = tmp_path / "cluster" / "head" / "blobs" / "partial"
        assert sorted(p.name for p in partial.iterdir()) == ["1" * 64, "2" * 64]
