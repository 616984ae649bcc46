"""Models from URIs over real servers: an HTTP server fetched from once however many
replicas ask; and S3 on a real cluster: moto's standalone S3 server on loopback, a head and a
scheduler as processes, the standard AWS environment variables (``AWS_ENDPOINT_URL`` points
s3fs at moto). A deployment from ``s3://models/iris.joblib`` serves, its two replicas from
one download; a python model's code comes from an S3 folder; a missing object is a deploy
error naming it."""

from __future__ import annotations

import asyncio
import collections
import http.server
import io
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import pytest_asyncio
from sklearn.linear_model import LogisticRegression

from shoal.errors import NotFound
from shoal.scheduler.artifacts import ArtifactCache
from shoal.testing.cluster import ProcessCluster

pytest.importorskip("moto")

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]


class MotoServer:
    """``moto_server`` on 127.0.0.1, port 0; ``requests`` are the request lines it logged."""

    def __init__(self) -> None:
        moto = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.requests: list[str] = []
        self._port: list[int] = []
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._started.wait(30) or not self._port:
            self.close()
            raise RuntimeError("moto_server did not start")
        self.url = f"http://127.0.0.1:{self._port[0]}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self._port.append(int(found[1]))
                self._started.set()
            elif '"' in line:
                self.requests.append(re.sub(r"\x1b\[[0-9;]*m", "", line.split('"')[1]))
        self._started.set()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class CountingServer:
    """A static HTTP server on 127.0.0.1, port 0, serving ``folder``; ``gets`` counts GETs by path."""

    def __init__(self, folder: Path) -> None:
        gets = self.gets = collections.Counter[str]()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self) -> None:
                gets[self.path] += 1
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


async def test_http_models_are_fetched_once_for_concurrent_and_later_replicas(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "model.onnx").write_bytes(b"o" * 300_000)
    server = CountingServer(tmp_path / "www")
    cache = ArtifactCache(tmp_path / "artifacts", limit_bytes=10**7)
    try:
        uri = f"{server.url}/model.onnx"
        leases = await asyncio.gather(cache.acquire(uri), cache.acquire(uri))
        later = await cache.acquire(uri)
        assert {lease.path for lease in [*leases, later]} == {leases[0].path}
        assert leases[0].path.name == "model.onnx" and leases[0].path.read_bytes() == b"o" * 300_000
        assert server.gets["/model.onnx"] == 1
        with pytest.raises(NotFound, match=re.escape(f"{server.url}/nothing.onnx: no such object or folder")):
            await cache.acquire(f"{server.url}/nothing.onnx")
    finally:
        await cache.aclose()
        server.close()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.close()


def aws_env(moto: MotoServer) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": moto.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def model(moto: MotoServer) -> LogisticRegression:
    """A classifier uploaded to ``s3://models/iris.joblib``."""
    import boto3

    x = np.array([[0, 0], [0, 1], [1, 0], [5, 5], [5, 6], [6, 5]], dtype=np.float32)
    estimator = LogisticRegression().fit(x, [0, 0, 0, 1, 1, 1])
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    env = aws_env(moto)
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="iris.joblib", Body=buffer.getvalue())
    # A python model's code folder: a module that imports its neighbour.
    s3.put_object(Bucket="models", Key="code/doubler/factor.py", Body=b"FACTOR = 2\n")
    s3.put_object(
        Bucket="models",
        Key="code/doubler/doubler.py",
        Body=b"from factor import FACTOR\n\n\nclass Doubler:\n"
        b"    def predict(self, inputs):\n        return {'y': inputs['x'] * FACTOR}\n",
    )
    return estimator


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, model: LogisticRegression
) -> AsyncIterator[ProcessCluster]:
    root = tmp_path_factory.mktemp("uris")
    env = {**aws_env(moto), "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    async with ProcessCluster(root / "cluster", env=env) as c:
        yield c


async def test_a_model_from_s3_serves_and_two_replicas_download_it_once(
    cluster: ProcessCluster, moto: MotoServer, model: LogisticRegression
) -> None:
    await cluster.deploy(
        {
            "name": "iris",
            "backend": "sklearn",
            "model": "s3://models/iris.joblib",
            "replicas": 2,
            "resources": {"cpus": 0.1},
        }
    )
    await cluster.wait_ready("iris", 2, timeout_s=45)
    x = np.array([[0.5, 0.5], [5.5, 5.5]], dtype=np.float32)
    outputs, _ = await cluster.send("iris", {"input": x})
    assert outputs["label"].tolist() == model.predict(x).tolist()
    # One download for both replicas: the scheduler's cache served the second.
    assert len([r for r in moto.requests if r.startswith("GET /models/iris.joblib ")]) == 1
    blobs = [p for p in (cluster.root / "scheduler0" / "artifacts").iterdir() if len(p.name) == 64]
    assert len(blobs) == 1


async def test_a_python_models_code_folder_from_s3_serves(cluster: ProcessCluster) -> None:
    await cluster.deploy(
        {
            "name": "doubler",
            "backend": "python",
            "model": "doubler:Doubler",
            "base_dir": "s3://models/code/doubler/",
            "resources": {"cpus": 0.1},
        }
    )
    await cluster.wait_ready("doubler", 1, timeout_s=45)
    outputs, _ = await cluster.send("doubler", {"x": np.array([1.0, 2.5], dtype=np.float32)})
    assert outputs["y"].tolist() == [2.0, 5.0]


async def test_a_missing_object_is_a_deploy_error_naming_it(cluster: ProcessCluster, tmp_path: Path) -> None:
    spec = tmp_path / "nothing.yaml"
    spec.write_text(
        "name: nothing\nbackend: sklearn\nmodel: s3://models/nothing.joblib\nresources: {cpus: 0.1}\n"
    )
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "shoal.cli", "--head", cluster.head_address, "deploy", str(spec)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**cluster.env, "SHOAL_HEAD": ""},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "fetching the model failed: s3://models/nothing.joblib: no such object or folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    await cluster.client.delete("nothing")
