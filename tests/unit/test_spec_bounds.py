"""Every number in a spec is bounded and finite, on every path a spec arrives by (issue 13,
items 1, 5 and 10): REST JSON, gRPC JSON, YAML files. A refusal is InvalidArgument (400 /
INVALID_ARGUMENT) naming the field."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal.config import Settings
from shoal.core.spec import (
    MAX_OPTIONS_BYTES,
    MAX_SPEC_JSON,
    MAX_VALUES,
    MIN_MEMORY_MB,
    check_model_id,
    load_spec_file,
    parse_spec,
    parse_spec_json,
)
from shoal.errors import InvalidArgument
from shoal.head.node import HeadNode
from shoal.http.head import head_app
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers

pytestmark = pytest.mark.timeout(10)

BASE: dict[str, Any] = {"name": "echo", "backend": "python", "model": "echo:Echo"}


def refused(doc: dict[str, Any]) -> str:
    with pytest.raises(InvalidArgument) as info:
        parse_spec(doc)
    assert info.value.http_status == 400
    return str(info.value)


# ------------------------------------------------------------------ non-finite numbers


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('"timeout_s": Infinity', "timeout_s"),
        ('"timeout_s": NaN', "timeout_s"),
        ('"resources": {"cpus": -Infinity}', "resources.cpus"),
        ('"batching": {"max_delay_ms": NaN}', "batching.max_delay_ms"),
        ('"health": {"ping_timeout_s": Infinity}', "health.ping_timeout_s"),
        ('"autoscaling": {"target_ongoing_requests": Infinity}', "autoscaling.target_ongoing_requests"),
        ('"options": {"scale": [1, 2, {"x": NaN}]}', "options.scale.2.x"),
    ],
)
def test_a_non_finite_number_in_json_is_refused_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_spec_json('{"name": "poison", "backend": "python", "model": "echo:Echo", ' + text + "}")
    assert f"invalid deployment spec 'poison': {field}: must be a finite number" in str(info.value)


def test_yaml_inf_and_nan_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "poison.yaml"
    path.write_text("name: poison\nbackend: python\nmodel: echo:Echo\ntimeout_s: .inf\noptions: {a: .nan}\n")
    with pytest.raises(InvalidArgument) as info:
        load_spec_file(path)
    assert "options.a: must be a finite number" in str(info.value)
    assert "timeout_s: must be a finite number" in str(info.value)


@pytest.fixture
async def rest() -> AsyncIterator[tuple[httpx.AsyncClient, MemoryStore]]:
    store = MemoryStore()
    node = HeadNode(Settings(), store, FakeSchedulers())
    transport = httpx.ASGITransport(app=head_app(node))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client, store
    await node.aclose()
    await store.close()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            '{"name":"poison","backend":"python","model":"echo:Echo","replicas":0,"timeout_s":Infinity}',
            "timeout_s: must be a finite number",
        ),
        (
            '{"name":"s","backend":"python","model":"echo:Echo","options":{"id":"\\ud800"}}',
            "options.id: not valid Unicode",
        ),
    ],
)
async def test_rest_refuses_with_400_and_stores_nothing(
    rest: tuple[httpx.AsyncClient, MemoryStore], body: str, error: str
) -> None:
    client, store = rest

    r = await client.post("/api/deployments", content=body, headers={"content-type": "application/json"})

    assert r.status_code == 400 and error in r.json()["error"]
    assert await store.list("deployments/") == []


# ------------------------------------------------------------------ bounds


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"autoscaling": {"min_replicas": 1_000_000, "max_replicas": 1_000_000}}, "autoscaling.min_replicas"),
        ({"autoscaling": {"min_replicas": 1, "max_replicas": 1001}}, "autoscaling.max_replicas"),
        ({"replicas": 1001}, "replicas"),
        ({"resources": {"cpus": 0}}, "resources.cpus"),
        ({"resources": {"memory_mb": 1e30}}, "resources.memory_mb"),
        # Fitted everywhere, and as its limit had each replica killed at its first ping.
        ({"resources": {"memory_mb": 1e-10}}, "resources.memory_mb"),
        ({"resources": {"memory_mb": 0.5}}, "resources.memory_mb"),
        ({"resources": {"gpus": 1e9}}, "resources.gpus"),
        ({"resources": {"gpus": 1.5}}, "resources.gpus"),  # whole above 1 (shoal.scheduler.gpus)
        ({"resources": {"gpus": 1e-10}}, "resources.gpus"),  # fitted everywhere, under placement's tolerance
        ({"timeout_s": 86_401}, "timeout_s"),
        ({"health": {"start_timeout_s": 1e12}}, "health.start_timeout_s"),
        ({"health": {"ping_interval_s": 1e12}}, "health.ping_interval_s"),
        ({"health": {"ping_failures": 10**9}}, "health.ping_failures"),
        ({"health": {"stable_after_s": 0.5}}, "health.stable_after_s"),
        ({"health": {"stable_after_s": 86_401}}, "health.stable_after_s"),
        ({"autoscaling": {"target_ongoing_requests": 5e-324}}, "autoscaling.target_ongoing_requests"),
        ({"autoscaling": {"target_ongoing_requests": 0.009}}, "autoscaling.target_ongoing_requests"),
        ({"autoscaling": {"upscale_delay_s": 1e12}}, "autoscaling.upscale_delay_s"),
        ({"autoscaling": {"downscale_delay_s": 1e12}}, "autoscaling.downscale_delay_s"),
        ({"max_ongoing_requests": 10**9}, "max_ongoing_requests"),
        ({"max_queued_requests": 10**12}, "max_queued_requests"),
        ({"inputs": [{"name": "x", "shape": [2**70]}]}, "inputs.0.shape"),
        ({"inputs": [{"name": f"x{i}"} for i in range(300)]}, "inputs"),
        ({"model": "m" * 5000}, "model"),
    ],
)
def test_every_number_is_bounded(change: dict[str, Any], field: str) -> None:
    assert f"{field}: " in refused({**BASE, **change})


@pytest.mark.parametrize("memory_mb", [0, MIN_MEMORY_MB, 1.5, 2**24])
def test_memory_mb_is_0_or_at_least_a_megabyte(memory_mb: float) -> None:
    assert parse_spec({**BASE, "resources": {"memory_mb": memory_mb}}).resources.memory_mb == memory_mb
    assert refused({**BASE, "resources": {"memory_mb": 1e-10}}) == (
        "invalid deployment spec 'echo': resources.memory_mb: must be 0 (not counted, no limit) or "
        "at least 1, got 1e-10"
    )


def test_the_bounds_themselves_are_accepted() -> None:
    spec = parse_spec(
        {
            **BASE,
            "replicas": 1000,
            "autoscaling": {"min_replicas": 1000, "max_replicas": 1000, "target_ongoing_requests": 0.01},
            "resources": {"cpus": 0.01},
            "timeout_s": 86_400,
            "health": {"start_timeout_s": 86_400},
        }
    )
    assert spec.initial_replicas() == 1000


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, "health.stable_after_s: Input should be greater than or equal to 1"),
        (-5, "health.stable_after_s: Input should be greater than or equal to 1"),
        (100_000, "health.stable_after_s: Input should be less than or equal to 86400"),
        ("soon", "health.stable_after_s: Input should be a valid number"),
    ],
)
async def test_a_bad_stable_after_s_is_a_400_naming_the_field(
    rest: tuple[httpx.AsyncClient, MemoryStore], value: object, error: str
) -> None:
    client, store = rest
    spec = {**BASE, "replicas": 0, "health": {"stable_after_s": value}}

    r = await client.post("/api/deployments", json=spec)

    assert r.status_code == 400 and error in r.json()["error"], r.text
    assert await store.list("deployments/") == []


def test_stable_after_s_is_the_heads_alone_and_restarts_no_replica() -> None:
    spec = parse_spec(BASE)
    assert spec.health.stable_after_s == 60.0
    longer = parse_spec({**BASE, "health": {"stable_after_s": 1}})
    assert longer.process_hash() == spec.process_hash()  # also: specs from before it keep theirs
    assert parse_spec({**BASE, "health": {"ping_failures": 5}}).process_hash() != spec.process_hash()


def test_batching_oversize_is_the_schedulers_alone_and_restarts_no_replica() -> None:
    batching = {"max_batch_size": 32, "max_delay_ms": 5}
    alone = parse_spec({**BASE, "batching": batching})
    refuse = parse_spec({**BASE, "batching": {**batching, "oversize": "refuse"}})
    assert (alone.max_request_rows, refuse.max_request_rows) == (0, 32)
    assert refuse.process_hash() == alone.process_hash()
    assert "batching.oversize: Input should be 'run_alone' or 'refuse'" in refused(
        {**BASE, "batching": {"oversize": "split"}}
    )


def test_options_over_64_kib_are_refused() -> None:
    five_mb = {"blob": "x" * (5 * 1024 * 1024)}
    assert "options: " in refused({**BASE, "options": five_mb})
    assert f"over the limit of {MAX_OPTIONS_BYTES}" in refused({**BASE, "options": five_mb})
    parse_spec({**BASE, "options": {"blob": "x" * (MAX_OPTIONS_BYTES - 20)}})


def test_options_nested_900_deep_are_refused_not_crashed() -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(900):
        inner["x"] = {}
        inner = inner["x"]
    assert "options: nested deeper than 32 levels" in refused({**BASE, "options": deep})
    # Also through JSON that json.loads still reads.
    text = json.dumps({**BASE, "options": deep})
    with pytest.raises(InvalidArgument, match="nested"):
        parse_spec_json(text)


def test_a_list_of_100000_inputs_is_refused_by_its_length_before_any_item_is_validated() -> None:
    # pydantic validates every item of a list before it compares the list's length with
    # the field's bound: this spec held the head's event loop 1.2 s before the count came
    # first. The message names the count, not the first items' problems.
    many = [{"name": f"x{i}", "datatype": "FP32", "shape": [-1]} for i in range(100_000)]
    assert "inputs: 100000 items, over the limit of 256" in refused({**BASE, "inputs": many})
    shape = [{"name": "x", "datatype": "FP32", "shape": [-1] * 100_000}]
    assert "inputs.0.shape: 100000 items, over the limit of 256" in refused({**BASE, "inputs": shape})
    resources = {f"r{i}": 1 for i in range(1000)}
    assert "resources: 1000 items, over the limit of 256" in refused({**BASE, "resources": resources})
    assert "the spec has 300 fields, over the limit of 256" in refused({f"f{i}": 1 for i in range(300)})
    # Within the bound, each field's own limit still speaks.
    assert "at most 32 items" in refused({**BASE, "inputs": [{**shape[0], "shape": [-1] * 33}]})
    parse_spec({**BASE, "inputs": many[:256]})
    # options are bounded by their size instead: a list of 1,000 numbers is fine there.
    parse_spec({**BASE, "options": {"vocabulary": list(range(1000))}})


def test_a_huge_options_list_is_refused_by_the_value_count_before_its_size_is_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 30 MB spec of 15,000,000 numbers in options held the head's event loop 12.5 s: every
    # number was visited, then the whole was written as JSON to find it over 64 KiB.
    def no_dumps(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("options measured as JSON")

    monkeypatch.setattr(json, "dumps", no_dumps)
    message = refused({**BASE, "options": {"a": [0] * 1_000_000}})
    assert f"options: the spec holds more than {MAX_VALUES} values" in message
    assert f"over the limit of {MAX_VALUES}" in message


def test_a_yaml_alias_bomb_is_refused_by_the_value_count(tmp_path: Path) -> None:
    # Nine levels of nine-fold aliases: 9**9 values from 1 KB of YAML. The walk visited each
    # aliased list at every place it is used, and shoal deploy never finished.
    lines = ["name: bomb", "backend: python", "model: echo:Echo", f"a: &a [{', '.join('x' * 9)}]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    bound = f"more than {MAX_VALUES} values .* over the limit of {MAX_VALUES}"
    with pytest.raises(InvalidArgument, match=bound):
        load_spec_file(path)
    # Aliases themselves are fine while the values they stand for stay within the bound.
    path.write_text("name: ok\nbackend: python\nmodel: echo:Echo\noptions: {a: &a [1, 2], b: *a}\n")
    (spec,) = load_spec_file(path)
    assert spec.options == {"a": [1, 2], "b": [1, 2]}


def test_spec_json_over_the_bound_is_refused_before_it_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("parsed")

    text = json.dumps({**BASE, "options": {"a": "x" * MAX_SPEC_JSON}})
    monkeypatch.setattr(json, "loads", no_loads)
    with pytest.raises(InvalidArgument, match=f"of JSON, over the limit of {MAX_SPEC_JSON}"):
        parse_spec_json(text)
    with pytest.raises(InvalidArgument, match=f"of JSON, over the limit of {MAX_SPEC_JSON}"):
        parse_spec_json(text.encode())


async def test_rest_refuses_a_spec_over_the_json_bound_with_400(
    rest: tuple[httpx.AsyncClient, MemoryStore],
) -> None:
    client, store = rest
    body = json.dumps({**BASE, "options": {"a": [0] * (MAX_SPEC_JSON // 2)}}, separators=(",", ":"))

    r = await client.post("/api/deployments", content=body, headers={"content-type": "application/json"})

    assert r.status_code == 400
    assert f"bytes of JSON, over the limit of {MAX_SPEC_JSON}" in r.json()["error"]
    assert await store.list("deployments/") == []


def test_the_largest_spec_within_the_other_bounds_passes_the_value_and_json_bounds() -> None:
    tensor = {"datatype": "FP32", "shape": [2**62] * 32}
    doc = {
        **BASE,
        "model": "echo:Echo",
        "base_dir": "/" + "b" * 4000,
        "inputs": [{**tensor, "name": f"{i:03d}" + "n" * 253} for i in range(256)],
        "outputs": [{**tensor, "name": f"{i:03d}" + "n" * 253} for i in range(256)],
        # Each value takes at least 2 bytes of options' 64 KiB as JSON ("0,").
        "options": {"a": [0] * (MAX_OPTIONS_BYTES // 2 - 8)},
        "auth": {"tokens": [f"t{i:03d}" + "x" * 59 for i in range(256)]},
    }
    assert parse_spec(doc).inputs[255].name.startswith("255")
    assert len(json.dumps(doc, indent=4)) < MAX_SPEC_JSON
    assert parse_spec_json(json.dumps(doc, indent=4)).options == doc["options"]


def test_yaml_nested_too_deep_is_invalid_argument(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("name: deep\nbackend: python\nmodel: m:M\noptions: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(InvalidArgument, match="nested"):
        load_spec_file(path)


# ------------------------------------------------------------------ multiplexing (issue 18)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"max_models_per_replica": 0}, "multiplexing.max_models_per_replica: Input should be greater than"),
        ({"max_models_per_replica": 1001}, "multiplexing.max_models_per_replica: Input should be less than"),
        ({}, "multiplexing.max_models_per_replica: Field required"),
        ({"max_models_per_replica": 2, "lru": True}, "multiplexing.lru: Extra inputs are not permitted"),
        (
            {"max_models_per_replica": 2, "load_timeout_s": 0},
            "multiplexing.load_timeout_s: Input should be greater than 0",
        ),
        (
            {"max_models_per_replica": 2, "load_timeout_s": 86_401},
            "multiplexing.load_timeout_s: Input should be less than or equal to 86400",
        ),
    ],
)
def test_a_bad_multiplexing_section_is_refused_naming_the_field(
    section: dict[str, Any], message: str
) -> None:
    assert message in refused({**BASE, "multiplexing": section})


def test_multiplexing_changes_the_process_hash_and_its_absence_keeps_the_old_one() -> None:
    plain = parse_spec(BASE)
    multiplexed = parse_spec({**BASE, "multiplexing": {"max_models_per_replica": 20}})
    assert multiplexed.multiplexing is not None and multiplexed.multiplexing.max_models_per_replica == 20
    assert multiplexed.process_hash() != plain.process_hash()
    assert "multiplexing" not in plain.model_dump_json(exclude_defaults=True)


def test_a_load_timeout_left_out_keeps_a_multiplexed_specs_process_hash() -> None:
    """``multiplexing.load_timeout_s`` came later: a spec without it keeps the hash it had
    (its replicas are not restarted by an upgrade); setting it restarts them."""
    mux = {**BASE, "multiplexing": {"max_models_per_replica": 20}}
    assert parse_spec(mux).process_hash() == "22297a2ef1ef"  # as before the field existed
    timed = parse_spec({**BASE, "multiplexing": {"max_models_per_replica": 20, "load_timeout_s": 30}})
    assert timed.process_hash() != "22297a2ef1ef"


@pytest.mark.parametrize("model_id", ["../etc/passwd", "a/b", ".hidden", "", "x" * 129, "a\n", "é", "a b"])
def test_a_model_id_that_is_not_a_plain_name_is_refused(model_id: str) -> None:
    with pytest.raises(InvalidArgument, match="is not a plain name"):
        check_model_id(model_id)


def test_plain_model_ids_pass() -> None:
    for model_id in ("customer-17", "A.b_c-9", "x" * 128):
        assert check_model_id(model_id) == model_id


def test_a_deployment_cannot_take_the_name_of_the_statistics_route() -> None:
    """GET /v2/models/stats answers every model's statistics: a deployment named 'stats'
    served, but its metadata could not be reached over HTTP."""
    with pytest.raises(InvalidArgument, match="route /v2/models/stats"):
        parse_spec({"name": "stats", "backend": "python", "model": "m:M"})
    assert parse_spec({"name": "stats2", "backend": "python", "model": "m:M"}).name == "stats2"


# ------------------------------------------------------------------ the refusal itself


def test_a_spec_with_many_problems_names_the_first_ten_and_counts_the_rest() -> None:
    """250 inputs of a wrong datatype and shape were each named twice: a refusal of 150 KB
    (HTTP body, CLI output, the head's log)."""
    inputs = [{"name": f"i{i}", "datatype": "NOPE", "shape": "bad"} for i in range(250)]
    message = refused(
        {**BASE, "inputs": inputs, "outputs": [{"name": "o", "datatype": "FP32", "shape": [1]}]}
    )
    assert "inputs.0.datatype" in message
    assert "inputs.6.datatype" not in message
    assert "and 490 more problems" in message
    assert len(message) < 2_000


def test_a_refusal_quotes_at_most_200_characters_of_the_name() -> None:
    message = refused({**BASE, "name": "N" * 100_000})
    assert "(99800 more characters)" in message
    assert len(message) < 1_000
