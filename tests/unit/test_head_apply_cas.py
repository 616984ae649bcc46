"""An apply that names the revision it was based on (``if_revision``, as Kubernetes'
``resourceVersion``): HeadNode over a MemoryStore and fake schedulers, and the REST route.
Before, two operators' applies based on the same revision both went through: the second
silently undid the first."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import httpx
import pytest

from shoal.config import Settings
from shoal.core.clock import FakeClock
from shoal.core.spec import DeploymentSpec, parse_spec, parse_spec_json
from shoal.errors import FailedPrecondition, InvalidArgument, NotFound, ReplicasConflict, RevisionConflict
from shoal.head.node import ApplyResult, HeadNode
from shoal.http.head import head_app
from shoal.store import MemoryStore
from shoal.testing.fakes import FakeSchedulers

pytestmark = pytest.mark.timeout(10)


def make_spec(model: str = "a:M", **extra: object) -> DeploymentSpec:
    return parse_spec({"name": "app", "backend": "python", "model": model, "resources": {"cpus": 1}, **extra})


@pytest.fixture
async def head(store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock) -> AsyncIterator[HeadNode]:
    node = HeadNode(Settings(), store, fleet, clock)
    yield node
    await node.aclose()


def models(head: HeadNode) -> list[str]:
    return [parse_spec_json(r.spec_json).model for r in head.history.revisions("app")]


async def test_an_apply_based_on_a_revision_that_is_no_longer_current_is_refused(head: HeadNode) -> None:
    await head.apply(make_spec("a:M"))
    assert (await head.apply(make_spec("b:M"), if_revision=1)).revision == 2  # operator A, from 1

    with pytest.raises(RevisionConflict) as err:  # operator B, also from 1
        await head.apply(make_spec("c:M"), if_revision=1)
    assert str(err.value) == (
        "deployment 'app' is at revision 2 (updated), not revision 1: nothing was applied; look at "
        "its history ('shoal history app') and apply again with if_revision 2 once the spec has its changes"
    )
    assert err.value.http_status == 409
    assert head.desired["app"].model == "b:M"
    assert models(head) == ["a:M", "b:M"]
    assert [e.kind for e in head.history.events("app")] == ["created", "updated"]

    assert (await head.apply(make_spec("c:M"), if_revision=2)).revision == 3
    assert (await head.apply(make_spec("d:M"))).revision == 4  # without it: the last writer wins


async def test_of_two_applies_at_once_from_the_same_revision_one_wins(head: HeadNode) -> None:
    await head.apply(make_spec("a:M"))
    results = await asyncio.gather(
        head.apply(make_spec("b:M"), if_revision=1),
        head.apply(make_spec("c:M"), if_revision=1),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, ApplyResult)]
    lost = [r for r in results if isinstance(r, RevisionConflict)]
    assert (len(won), len(lost)) == (1, 1)
    assert "is at revision 2 (updated), not revision 1" in str(lost[0])
    assert len(models(head)) == 2 and models(head)[1] == head.desired["app"].model


async def test_if_revision_0_creates_only_and_a_revision_of_a_deleted_deployment_is_refused(
    head: HeadNode,
) -> None:
    assert (await head.apply(make_spec("a:M"), if_revision=0)).created
    with pytest.raises(
        RevisionConflict, match=r"exists already, at revision 1 \(created\) \(expected none\)"
    ):
        await head.apply(make_spec("b:M"), if_revision=0)
    await head.delete("app")
    with pytest.raises(
        RevisionConflict, match=r"does not exist \(expected revision 1\).*if_revision 0 to create"
    ):
        await head.apply(make_spec("b:M"), if_revision=1)
    assert "app" not in head.desired
    assert (await head.apply(make_spec("b:M"), if_revision=0)).created


@pytest.mark.parametrize("bad", [-1, True, 2**31])
async def test_an_if_revision_that_is_no_revision_number_is_invalid(head: HeadNode, bad: int) -> None:
    with pytest.raises(InvalidArgument, match="if_revision must be a revision number from 1 to 2147483647"):
        await head.apply(make_spec(), if_revision=bad)
    assert head.desired == {}


async def test_the_rest_apply_takes_if_revision_and_answers_409_naming_the_revision(head: HeadNode) -> None:
    transport = httpx.ASGITransport(app=head_app(head))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        spec = make_spec("a:M").model_dump(mode="json")
        created = await client.post("/api/deployments?if_revision=0", json=spec)
        again = await client.post("/api/deployments?if_revision=0", json=spec)
        updated = await client.post("/api/deployments?if_revision=1", json={**spec, "model": "b:M"})
        stale = await client.post("/api/deployments?if_revision=1", json={**spec, "model": "c:M"})
        bad = {
            q: await client.post(f"/api/deployments?{q}", json=spec)
            for q in ("if_revision=-1", "if_revision=x")
        }
        # Misspelt, it would have applied unchecked.
        misspelt = await client.post("/api/deployments?if_revison=2", json={**spec, "model": "c:M"})
        schema = (await client.get("/openapi.json")).json()
        read = (await client.get("/api/deployments/app")).json()

    assert (created.status_code, created.json()) == (
        201,
        {"name": "app", "created": True, "changed": True, "revision": 1, "change": "created"},
    )
    assert again.status_code == 409
    assert again.json()["error"].startswith("deployment 'app' exists already, at revision 1 (created)")
    assert (updated.status_code, updated.json()["revision"]) == (200, 2)
    assert stale.status_code == 409
    assert stale.json()["error"].startswith("deployment 'app' is at revision 2 (updated), not revision 1")
    for r in bad.values():
        assert r.status_code == 400
        assert r.json()["error"].startswith("if_revision must be an integer from 0 to 2147483647")
    assert misspelt.status_code == 400
    assert misspelt.json()["error"] == "unknown query parameter 'if_revison': only if_revision is known"
    assert head.desired["app"].model == "b:M"
    assert (read["revision"], read["spec"]["model"]) == (2, "b:M")  # what the next if_revision names
    post = schema["paths"]["/api/deployments"]["post"]
    assert [p["name"] for p in post["parameters"]] == ["if_revision"]
    assert "409" in post["responses"]


async def test_an_if_revision_from_before_a_delete_never_matches_the_deployment_created_after(
    head: HeadNode, store: MemoryStore, fleet: FakeSchedulers, clock: FakeClock
) -> None:
    await head.apply(make_spec("a:M"))
    seen = (await head.apply(make_spec("b:M"))).revision  # a client reads revision 2
    await head.delete("app")
    assert (await head.apply(make_spec("c:M"))).revision == 3  # another deployment, same name
    assert (await head.apply(make_spec("d:M"))).revision == 4

    with pytest.raises(RevisionConflict, match=r"is at revision 4 \(updated\), not revision 2"):
        await head.apply(make_spec("x:M"), if_revision=seen)
    assert head.desired["app"].model == "d:M"
    assert [r.number for r in head.history.revisions("app")] == [3, 4]
    with pytest.raises(NotFound, match=r"has no revision 2 \(kept: 3 to 4\)"):
        await head.rollback("app", 2)  # the deleted deployment's revisions are gone

    # Deleted again, and a new head on the same store: the numbers go on from its tombstone.
    await head.delete("app")
    again = HeadNode(Settings(), store, fleet, clock)
    await again.start()
    try:
        assert (await again.apply(make_spec("e:M"), if_revision=0)).revision == 5
    finally:
        await again.aclose()


async def test_a_name_whose_tombstone_expired_numbers_above_every_revision_it_had(
    head: HeadNode, store: MemoryStore
) -> None:
    week_and_a_day = time.time() - 8 * 86_400
    old = {f"old-{i}": 10 + i for i in range(70)}  # more than one commit can drop
    for name, last in old.items():
        await store.put(f"tombstones/{name}", json.dumps({"deleted_at": week_and_a_day, "revision": last}))
    await head.start()
    assert (await head.apply(make_spec())).revision == 1
    await head.delete("app")  # drops the old tombstones one commit has room for
    tomb = await store.get("tombstones/app")
    assert tomb is not None and json.loads(tomb.value)["revision"] == 1

    left = {e.key.removeprefix("tombstones/") for e in await store.list("tombstones/")}
    dropped = set(old) - left
    assert dropped and set(old) & left
    # Their numbers stay taken: a name without a tombstone numbers above all of them (nothing
    # keeps every name ever used), and one with a tombstone above its own too.
    floor = max(old[n] for n in dropped)
    assert (await head.apply(make_spec(name=min(dropped)))).revision == floor + 1
    assert (await head.apply(make_spec(name="new"))).revision == floor + 1
    assert (await head.apply(make_spec(name="old-69"))).revision == 80
    assert (await head.apply(make_spec())).revision == floor + 1


async def test_a_scale_based_on_a_spec_revision_that_is_no_longer_current_is_refused(head: HeadNode) -> None:
    await head.apply(make_spec("a:M"))
    seen = head.history.current("app")
    assert seen is not None  # an operator reads revision 1 (model a:M) and means to scale it
    await head.apply(make_spec("b:M"), if_revision=1)  # another operator's update: revision 2

    with pytest.raises(RevisionConflict) as err:
        await head.scale("app", 5, if_revision=seen.number)
    assert str(err.value) == (
        "deployment 'app' is at revision 2 (updated), not revision 1: nothing was scaled; look at "
        "its history ('shoal history app') and scale again with if_revision 2 if the count still fits"
    )
    assert head.desired["app"].replicas == 1
    with pytest.raises(RevisionConflict, match=r"exists already, at revision 2 \(updated\) \(expected none"):
        await head.scale("app", 5, if_revision=0)
    with pytest.raises(InvalidArgument, match="if_revision must be a revision number"):
        await head.scale("app", 5, if_revision=-1)
    with pytest.raises(NotFound):
        await head.scale("nothing", 5, if_revision=1)

    await head.scale("app", 5, if_revision=2)
    await head.scale("app", 3, if_revision=2)  # a scale makes no revision: it guards no other scale
    assert head.desired["app"].replicas == 3
    assert [e.kind for e in head.history.events("app")] == ["created", "updated", "scaled", "scaled"]


async def test_the_rest_scale_takes_if_revision_and_answers_409(head: HeadNode) -> None:
    await head.apply(make_spec("a:M"))
    await head.apply(make_spec("b:M"))
    transport = httpx.ASGITransport(app=head_app(head))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        stale = await client.post("/api/deployments/app/scale?if_revision=1", json={"replicas": 4})
        bad = await client.post("/api/deployments/app/scale?if_revision=-1", json={"replicas": 4})
        misspelt = await client.post("/api/deployments/app/scale?if_revison=1", json={"replicas": 4})
        fresh = await client.post("/api/deployments/app/scale?if_revision=2", json={"replicas": 2})
        schema = (await client.get("/openapi.json")).json()

    assert stale.status_code == 409
    assert stale.json()["error"].startswith("deployment 'app' is at revision 2 (updated), not revision 1")
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("if_revision must be an integer from 0 to 2147483647")
    assert misspelt.status_code == 400
    assert misspelt.json()["error"] == (
        "unknown query parameter 'if_revison': only if_revision and if_replicas are known"
    )
    assert (fresh.status_code, fresh.json()) == (200, {"name": "app", "replicas": 2})
    assert head.desired["app"].replicas == 2
    post = schema["paths"]["/api/deployments/{name}/scale"]["post"]
    assert [p["name"] for p in post["parameters"]] == ["if_revision", "if_replicas"]
    assert "409" in post["responses"]


async def test_a_refused_scale_names_one_replica_in_the_singular(head: HeadNode) -> None:
    await head.apply(make_spec(replicas=1))
    with pytest.raises(ReplicasConflict, match=r"^deployment 'app' is scaled to 1 replica, not 2: "):
        await head.scale("app", 3, if_replicas=2)
    assert head.desired["app"].replicas == 1


async def test_of_two_scales_at_once_from_the_same_count_one_wins(
    head: HeadNode, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two operators both read 3 replicas; one means +1, the other +2. Before, both went
    # through (a scale makes no revision for if_revision to tell apart): the last won unseen.
    await head.apply(make_spec(replicas=3))
    commit = store.commit

    async def slow_commit(puts: Mapping[str, str], deletes: Sequence[str] = ()) -> int:
        for _ in range(5):  # a write takes time, as on SQLite or etcd: the other scale runs meanwhile
            await asyncio.sleep(0)
        return await commit(puts, deletes)

    monkeypatch.setattr(store, "commit", slow_commit)
    results = await asyncio.gather(
        head.scale("app", 4, if_replicas=3), head.scale("app", 5, if_replicas=3), return_exceptions=True
    )
    lost = [r for r in results if isinstance(r, ReplicasConflict)]
    assert results.count(None) == 1 and len(lost) == 1, results
    now = head.desired["app"].replicas
    assert now in (4, 5)
    assert str(lost[0]) == (
        f"deployment 'app' is scaled to {now} replicas, not 3: nothing was scaled; its count changed "
        f"since it was read ('shoal events app' shows what changed it): scale again with if_replicas "
        f"{now} if {9 - now} still fits"
    )
    assert lost[0].http_status == 409
    assert [e.kind for e in head.history.events("app")] == ["created", "scaled"]

    await head.scale("app", 6, if_replicas=now)  # from the count it has now: goes through
    assert head.desired["app"].replicas == 6


async def test_if_replicas_is_bounded_and_an_autoscaled_deployment_is_refused_either_way(
    head: HeadNode,
) -> None:
    await head.apply(make_spec(replicas=2))
    for bad in (-1, 1001, True, 2.0):
        with pytest.raises(InvalidArgument, match=r"if_replicas must be an integer from 0 to 1000, got"):
            await head.scale("app", 3, if_replicas=bad)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await head.scale("nothing", 3, if_replicas=2)
    assert head.desired["app"].replicas == 2

    # An autoscaled deployment's count is the autoscaler's: no scale goes through, if_replicas
    # or not, and the refusal says why rather than naming a count.
    await head.apply(make_spec(name="auto", autoscaling={"min_replicas": 1, "max_replicas": 4}))
    with pytest.raises(FailedPrecondition, match="'auto' is autoscaled") as err:
        await head.scale("auto", 3, if_replicas=1)
    assert not isinstance(err.value, ReplicasConflict)


async def test_the_rest_scale_takes_if_replicas_and_answers_409(head: HeadNode) -> None:
    await head.apply(make_spec(replicas=3))
    transport = httpx.ASGITransport(app=head_app(head))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        first = await client.post("/api/deployments/app/scale?if_replicas=3", json={"replicas": 4})
        second = await client.post("/api/deployments/app/scale?if_replicas=3", json={"replicas": 5})
        bad = await client.post("/api/deployments/app/scale?if_replicas=5000", json={"replicas": 5})
        both = await client.post(
            "/api/deployments/app/scale?if_replicas=4&if_revision=1", json={"replicas": 2}
        )

    assert (first.status_code, first.json()) == (200, {"name": "app", "replicas": 4})
    assert second.status_code == 409
    assert second.json()["error"].startswith(
        "deployment 'app' is scaled to 4 replicas, not 3: nothing was scaled"
    )
    assert bad.status_code == 400
    assert bad.json()["error"] == "if_replicas must be an integer from 0 to 1000, got '5000'"
    assert both.status_code == 200
    assert head.desired["app"].replicas == 2
