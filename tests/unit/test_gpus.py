"""GPUs a scheduler hands its replicas (shoal.scheduler.gpus): whole devices for whole
numbers, one shared device (best fit) for a fraction, none for 0, and the devices the
machine offers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from shoal.errors import InvalidArgument, ResourceExhausted
from shoal.scheduler import node
from shoal.scheduler.gpus import Devices, GpuPool, machine_devices, parse_visible
from tests.unit.conftest import make_spec

pytestmark = pytest.mark.timeout(10)


def pool(n: int) -> GpuPool:
    return GpuPool(machine_devices(n, {}, lambda: 0))


def no_nvml() -> int:
    """A machine whose GPUs cannot be counted: given a number, a scheduler offers it."""
    return 0


def eight() -> int:
    return 8


# ------------------------------------------------------------------ the machine's devices


def test_gpus_given_without_nvml_are_0_to_n_minus_1() -> None:
    devices = machine_devices(3, {}, eight)
    assert devices == Devices(("0", "1", "2"), (1.0, 1.0, 1.0), numbered=True)
    assert devices.total == 3


def test_gpus_given_above_what_the_machine_has_are_offered_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="shoal.scheduler"):
        assert machine_devices(2, {}, eight).total == 2
        assert not caplog.records
        assert machine_devices(2, {}, no_nvml).names == ("0", "1")
    [record] = caplog.records
    assert record.getMessage() == (
        "gpus 2, but 0 GPU(s) found on this machine: offering 2 as told; a replica given one "
        "that is not there will fail to use it"
    )


def test_gpus_counted_by_nvml_when_not_given() -> None:
    assert machine_devices(-1, {}, lambda: 2).names == ("0", "1")
    assert machine_devices(-1, {}, lambda: 0) == Devices()


def test_the_schedulers_own_cuda_visible_devices_names_its_devices() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "2, GPU-5e1c,7"}
    assert machine_devices(-1, env, lambda: 8).names == ("2", "GPU-5e1c", "7")
    # --gpus takes the first N of them; never more than it lists.
    assert machine_devices(2, env, no_nvml).names == ("2", "GPU-5e1c")
    assert machine_devices(5, env, no_nvml).total == 3
    # Listed devices are numbered by whoever listed them: no CUDA_DEVICE_ORDER of ours.
    assert not machine_devices(-1, env, lambda: 8).numbered
    assert machine_devices(-1, {"CUDA_VISIBLE_DEVICES": ""}, lambda: 8) == Devices((), (), numbered=False)


def test_cuda_visible_devices_is_read_as_cuda_reads_it() -> None:
    assert parse_visible(None) is None
    assert parse_visible("") == []
    assert parse_visible("0,1") == ["0", "1"]
    assert parse_visible("0,-1,2") == ["0"]  # CUDA stops at the first invalid entry
    assert parse_visible("3,,4") == ["3"]


def test_a_fractional_gpus_offers_that_share_of_its_last_device() -> None:
    assert machine_devices(1.5, {}, no_nvml) == Devices(("0", "1"), (1.0, 0.5))
    half = GpuPool(machine_devices(0.5, {}, no_nvml))
    with pytest.raises(ResourceExhausted):
        half.acquire("whole", 1)
    assert half.acquire("a", 0.5).devices == (0,)


# ------------------------------------------------------------------ the pool


def test_whole_numbers_get_devices_no_other_replica_uses() -> None:
    p = pool(4)
    a, b = p.acquire("a", 1), p.acquire("b", 2)
    assert (a.devices, a.share) == ((0,), 1.0)
    assert (b.devices, b.share) == ((1, 2), 1.0)
    # A fraction may not share a device held whole: it goes to the one left.
    assert p.acquire("c", 0.5).devices == (3,)
    with pytest.raises(ResourceExhausted, match=r"GPU 3: 0\.5 free, held by c"):
        p.acquire("d", 1)  # 0.5 free on GPU 3, but not a whole device
    assert p.grant("d") is None


def test_a_fraction_goes_to_the_device_it_fills_best() -> None:
    p = pool(3)
    assert p.acquire("a", 0.5).devices == (0,)
    assert p.acquire("b", 0.7).devices == (1,)
    # 0.3 fits GPU 0 (0.5 free), GPU 1 (0.3 free) and GPU 2 (idle): GPU 1 is left fullest.
    assert p.acquire("c", 0.3).devices == (1,)
    assert p.acquire("d", 0.5).devices == (0,)
    # Whole devices stay free for whole requests.
    assert p.acquire("e", 1).devices == (2,)
    with pytest.raises(ResourceExhausted, match="no GPU of this scheduler has that much free"):
        p.acquire("f", 0.1)


def test_thirds_fill_one_device() -> None:
    p = pool(1)
    for owner in "abc":
        assert p.acquire(owner, 1 / 3).devices == (0,)
    with pytest.raises(ResourceExhausted):
        p.acquire("d", 0.01)


def test_released_devices_are_given_again() -> None:
    p = pool(2)
    p.acquire("a", 1)
    p.acquire("b", 1)
    with pytest.raises(ResourceExhausted):
        p.acquire("c", 0.5)
    assert p.release("a") is not None
    assert p.acquire("c", 0.5).devices == (0,)
    assert p.release("a") is None  # once


def test_zero_gpus_holds_nothing_and_a_fraction_above_one_is_refused() -> None:
    p = pool(1)
    none = p.acquire("cpu", 0)
    assert none.devices == () and p.grant("cpu") is None
    assert p.environment(none) == {"CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    with pytest.raises(InvalidArgument, match="whole"):
        pool(2).acquire("x", 1.5)


def test_a_scheduler_that_offers_no_gpu_leaves_the_environment_alone() -> None:
    p = GpuPool()
    assert not p.managed
    assert p.environment(p.acquire("cpu", 0)) == {}
    with pytest.raises(ResourceExhausted, match="offers no GPU"):
        p.acquire("gpu", 1)


def test_environment_names_the_schedulers_own_devices() -> None:
    p = GpuPool(machine_devices(-1, {"CUDA_VISIBLE_DEVICES": "4,6"}, no_nvml))
    p.acquire("a", 1)
    assert p.environment(p.acquire("b", 0.25)) == {"CUDA_VISIBLE_DEVICES": "6"}
    assert p.describe(p.grant("b")) == "0.25 of GPU 6"
    assert p.describe(p.grant("a")) == "GPU 4"


def test_a_spec_asks_a_fraction_up_to_one_or_whole_gpus() -> None:
    for gpus in (0, 0.25, 1, 2, 8.0):
        assert make_spec(resources={"gpus": gpus}).resources.gpus == gpus
    # 1.5 is refused: tests/unit/test_spec_bounds.py.


def test_without_nvml_the_drivers_list_counts_the_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    monkeypatch.setattr(node, "NVIDIA_PROC", tmp_path / "gpus")
    assert node._count_gpus() == 0  # no NVIDIA driver
    for address in ("0000:18:00.0", "0000:3b:00.0"):
        (tmp_path / "gpus" / address).mkdir(parents=True)
    assert node._count_gpus() == 2
