"""Models named by URI in a spec: which forms are accepted, and which URIs the
``allowed_model_dirs`` / ``allowed_model_uris`` settings let through."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.config import Settings
from shoal.core.model_dirs import check_deployable
from shoal.errors import InvalidArgument
from tests.unit.conftest import make_spec


@pytest.mark.parametrize(
    "uri",
    [
        "s3://models/iris.joblib",
        "gs://models/iris.onnx",
        "https://files.example.com/iris.joblib",
        "file:///srv/models/iris.joblib",
        "s3://models/iris.joblib#sha256=" + "a" * 64,
    ],
)
def test_a_model_may_be_a_uri(uri: str) -> None:
    spec = make_spec("iris", backend="sklearn", model=uri)
    assert spec.artifact_uri() == uri
    assert spec.localized(Path("/cache/x/iris.joblib")).model == "/cache/x/iris.joblib"


def test_a_python_deployments_code_folder_may_be_a_uri() -> None:
    spec = make_spec("echo", model="echo:Echo", base_dir="s3://code/echo/")
    assert spec.artifact_uri() == "s3://code/echo/"
    assert spec.localized(Path("/cache/abc")).base_dir == "/cache/abc"
    assert make_spec("echo", model="echo:Echo", base_dir="/srv/code").artifact_uri() == ""


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"backend": "sklearn", "model": "ftp://host/m.joblib"}, "URI scheme 'ftp' is not supported"),
        ({"backend": "sklearn", "model": "s3://"}, "names no bucket, host or path"),
        ({"backend": "sklearn", "model": "s3://b/m.joblib#md5=abc"}, "fragment may only be '#sha256='"),
        ({"backend": "python", "model": "s3://b/m.py"}, "put its code's URI in base_dir"),
        ({"backend": "sklearn", "model": "m.joblib", "base_dir": "s3://b/"}, "only for the python backend"),
    ],
)
def test_bad_uris_are_refused_naming_the_problem(fields: dict[str, str], problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem):
        make_spec("iris", **fields)  # type: ignore[arg-type]


def test_any_uri_is_allowed_when_nothing_is_restricted() -> None:
    check_deployable(make_spec("iris", backend="sklearn", model="s3://any/m.joblib"), ())


def test_with_model_dirs_set_uris_need_allowed_model_uris(tmp_path: Path) -> None:
    spec = make_spec("iris", backend="sklearn", model="s3://models/prod/iris.joblib")
    with pytest.raises(
        InvalidArgument, match="list the URI prefixes models may come from in allowed_model_uris"
    ):
        check_deployable(spec, (str(tmp_path),))
    check_deployable(spec, (str(tmp_path),), ("s3://models/prod/",))


@pytest.mark.parametrize(
    "uri",
    [
        "s3://models/staging/iris.joblib",
        "s3://models/prod-evil/iris.joblib",  # a prefix ends at a '/'
        "s3://models/prod/../staging/iris.joblib",
        "s3://models/prod/%2e%2e/staging/iris.joblib",
        "gs://models/prod/iris.joblib",  # another scheme
    ],
)
def test_allowed_model_uris_are_prefixes(uri: str) -> None:
    settings = Settings(allowed_model_uris="s3://models/prod https://files.example.com/models/")
    assert settings.model_uri_prefixes == ("s3://models/prod", "https://files.example.com/models/")
    with pytest.raises(InvalidArgument, match="outside the URIs models may come from"):
        check_deployable(make_spec("iris", backend="sklearn", model=uri), (), settings.model_uri_prefixes)
    for ok in ("s3://models/prod/iris.joblib", "https://files.example.com/models/a/b.onnx"):
        check_deployable(make_spec("iris", backend="sklearn", model=ok), (), settings.model_uri_prefixes)


def test_a_file_uri_is_a_path_checked_against_model_dirs(tmp_path: Path) -> None:
    inside = make_spec("iris", backend="sklearn", model=(tmp_path / "m.joblib").as_uri())
    outside = make_spec("iris", backend="sklearn", model="file:///etc/m.joblib")
    check_deployable(inside, (str(tmp_path),))
    with pytest.raises(InvalidArgument, match="outside the folders models may come from"):
        check_deployable(outside, (str(tmp_path),))
    with pytest.raises(InvalidArgument, match="not host 'elsewhere'"):
        check_deployable(make_spec("iris", backend="sklearn", model="file://elsewhere/m.joblib"), ())


def test_a_python_file_uri_folder_is_checked_at_deploy_as_its_path_is(tmp_path: Path) -> None:
    """Before, only the folder was checked: a module in it linked to a file outside passed."""
    allowed, outside = tmp_path / "models", tmp_path / "outside"
    (allowed / "pkg").mkdir(parents=True)
    outside.mkdir()
    (outside / "evil.py").write_text("class Evil:\n    pass\n")
    (allowed / "pkg" / "evil.py").symlink_to(outside / "evil.py")
    (allowed / "pkg" / "m.py").write_text("class M:\n    pass\n")
    uri = (allowed / "pkg").as_uri() + "/"
    with pytest.raises(InvalidArgument, match=r"module 'evil' \(not a file under base_dir 'file://"):
        check_deployable(make_spec("x", model="evil:Evil", base_dir=uri), (str(allowed),))
    with pytest.raises(InvalidArgument, match=r"'Nope' \(not a class"):
        check_deployable(make_spec("x", model="m:Nope", base_dir=uri), (str(allowed),))
    check_deployable(make_spec("x", model="m:M", base_dir=uri), (str(allowed),))
