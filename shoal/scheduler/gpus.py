"""The GPUs of a scheduler's machine, and which of them each replica it starts gets.

The head counts GPUs as one number per scheduler (``Capacity.gpus``); the scheduler owns
the devices themselves and hands each replica its own in ``CUDA_VISIBLE_DEVICES``:

- ``gpus: k``, a whole number of 1 or more: ``k`` devices no other replica uses;
- ``gpus: f`` below 1: a share of one device, the one whose free share is the smallest that
  still holds ``f`` (best fit, so that whole devices stay free for whole requests);
- ``gpus: 0``: no device. While this scheduler offers GPUs at all, ``CUDA_VISIBLE_DEVICES``
  is then empty, so the replica sees none;
- a fraction above 1 (``1.5``) is refused by the spec (``shoal.core.spec.Resources``).

Devices are numbered as CUDA numbers them for the scheduler: ``0..N-1``, or the entries of
the scheduler's own ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) when it has one. Pure
bookkeeping: the supervisor calls it under its lock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from shoal.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger("shoal.scheduler")

EPSILON = 1e-9
VISIBLE = "CUDA_VISIBLE_DEVICES"
MAX_DEVICES = 1024  # as many as one replica may ask (``Resources.gpus``)
ORDER = "CUDA_DEVICE_ORDER"


def is_whole(gpus: float) -> bool:
    return abs(gpus - round(gpus)) <= EPSILON


def parse_visible(value: str | None) -> list[str] | None:
    """The devices a ``CUDA_VISIBLE_DEVICES`` value lists (None when it is not set). As CUDA
    reads it: entries up to the first empty or negative one; ``""`` lists none."""
    if value is None:
        return None
    out: list[str] = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        out.append(entry)
    return out


@dataclass(frozen=True)
class Devices:
    """What a scheduler offers: each device's name in ``CUDA_VISIBLE_DEVICES`` and the share
    of it replicas may take (1.0, or less for the last one under a fractional ``--gpus``)."""

    names: tuple[str, ...] = ()
    sizes: tuple[float, ...] = ()
    # The scheduler numbers the devices itself (no CUDA_VISIBLE_DEVICES of its own): its
    # replicas then get CUDA_DEVICE_ORDER=PCI_BUS_ID, so "GPU 1" is nvidia-smi's GPU 1.
    numbered: bool = True

    @property
    def total(self) -> float:
        return sum(self.sizes)


def machine_devices(gpus: float, environ: Mapping[str, str], count: Callable[[], int]) -> Devices:
    """The devices a scheduler offers: ``gpus`` of them (the ``gpus`` setting; below 0: all it
    sees), from its own ``CUDA_VISIBLE_DEVICES`` when set, else ``0..N-1`` with N from
    ``count`` (NVML) unless ``gpus`` says. A fractional ``gpus`` offers that share of the last.
    A ``gpus`` above what ``count`` finds is offered as told, with a warning: a mistake, or
    pretend devices (tests)."""
    listed = parse_visible(environ.get(VISIBLE))
    if gpus >= 0:
        want = gpus
    elif listed is not None:
        want = float(len(listed))
    else:
        want = float(count())
    if want > MAX_DEVICES:
        log.warning("gpus %g: offering %d, the most one scheduler offers", want, MAX_DEVICES)
        want = float(MAX_DEVICES)
    n = math.ceil(want - EPSILON) if want > EPSILON else 0
    if listed is not None and n > len(listed):
        log.warning(
            "gpus %g, but this scheduler's %s=%r lists %d device(s): offering those",
            want,
            VISIBLE,
            environ.get(VISIBLE),
            len(listed),
        )
        n = len(listed)
        want = float(n)
    if listed is None and gpus >= 0 and n and (seen := count()) < n:
        log.warning(
            "gpus %g, but %d GPU(s) found on this machine: offering %d as told; a replica "
            "given one that is not there will fail to use it",
            want,
            seen,
            n,
        )
    names = tuple(listed[:n]) if listed is not None else tuple(str(i) for i in range(n))
    sizes = [1.0] * n
    if n and want < n - EPSILON:
        sizes[-1] = want - (n - 1)
    return Devices(names, tuple(sizes), numbered=listed is None and ORDER not in environ)


@dataclass(frozen=True)
class GpuGrant:
    """The devices one replica got: positions in the pool, and the share of each it holds."""

    devices: tuple[int, ...] = ()
    share: float = 0.0


class GpuPool:
    """Which replica holds what share of which device. Owners are replica ids."""

    def __init__(self, devices: Devices | None = None) -> None:
        self.devices = devices or Devices()
        self._held: list[dict[str, float]] = [{} for _ in self.devices.names]
        self._grants: dict[str, GpuGrant] = {}

    @property
    def managed(self) -> bool:
        """Whether this scheduler offers any GPU (and so sets ``CUDA_VISIBLE_DEVICES``)."""
        return bool(self.devices.names)

    def used(self, device: int) -> float:
        return sum(self._held[device].values())

    def free(self, device: int) -> float:
        return max(0.0, self.devices.sizes[device] - self.used(device))

    def grant(self, owner: str) -> GpuGrant | None:
        return self._grants.get(owner)

    def acquire(self, owner: str, gpus: float) -> GpuGrant:
        """Devices for ``owner`` asking ``gpus``: ResourceExhausted when none fit,
        InvalidArgument for a fraction above 1. ``gpus`` 0 gets none (and holds nothing)."""
        if owner in self._grants:
            return self._grants[owner]
        if gpus <= EPSILON:
            return GpuGrant()
        if gpus > 1 and not is_whole(gpus):
            raise InvalidArgument(f"gpus {gpus:g}: above 1, a replica takes whole GPUs")
        if is_whole(gpus):
            k = round(gpus)
            idle = [
                i
                for i in range(len(self._held))
                if not self._held[i] and self.devices.sizes[i] >= 1 - EPSILON
            ]
            if len(idle) < k:
                raise ResourceExhausted(
                    f"gpus {k}: {len(idle)} of this scheduler's GPUs are unused; {self.describe()}"
                )
            return self.hold(owner, idle[:k], 1.0)
        room = [i for i in range(len(self._held)) if self.free(i) >= gpus - EPSILON]
        if not room:
            raise ResourceExhausted(
                f"gpus {gpus:g}: no GPU of this scheduler has that much free; {self.describe()}"
            )
        best = min(room, key=lambda i: (self.free(i) - gpus, i))
        return self.hold(owner, [best], gpus)

    def hold(self, owner: str, devices: Iterable[int], share: float) -> GpuGrant:
        """Record ``owner`` holding ``share`` of each of ``devices``, room or not (what a
        replica started earlier holds)."""
        grant = GpuGrant(tuple(devices), share)
        for i in grant.devices:
            self._held[i][owner] = share
        self._grants[owner] = grant
        return grant

    def release(self, owner: str) -> GpuGrant | None:
        grant = self._grants.pop(owner, None)
        if grant is not None:
            for i in grant.devices:
                self._held[i].pop(owner, None)
        return grant

    def positions(self, names: Sequence[str]) -> list[int]:
        """The pool's positions of the devices named ``names`` (those it still offers)."""
        return [self.devices.names.index(n) for n in names if n in self.devices.names]

    def names(self, grant: GpuGrant) -> list[str]:
        return [self.devices.names[i] for i in grant.devices]

    def environment(self, grant: GpuGrant) -> dict[str, str]:
        """What a replica holding ``grant`` gets in its environment: nothing when this
        scheduler offers no GPU, else its devices in ``CUDA_VISIBLE_DEVICES`` (empty: none)."""
        if not self.managed:
            return {}
        env = {VISIBLE: ",".join(self.names(grant))}
        if self.devices.numbered:
            env[ORDER] = "PCI_BUS_ID"
        return env

    def describe(self, grant: GpuGrant | None = None) -> str:
        """``grant`` as a log says it (``GPU 0,1``, ``0.5 of GPU 1``), or without one every
        device's free share."""
        if grant is not None:
            shown = ",".join(self.names(grant))
            if not grant.devices:
                return "no GPU"
            return f"GPU {shown}" if grant.share >= 1 - EPSILON else f"{grant.share:g} of GPU {shown}"
        if not self.managed:
            return "this scheduler offers no GPU"
        return "; ".join(self._device(i) for i in range(len(self._held)))

    def _device(self, i: int) -> str:
        """``GPU 1: 0.25 free, held by a-1, b-1``: a device's free share and its holders."""
        holders = sorted(self._held[i])
        shown = ", ".join(holders[:3]) + (f" and {len(holders) - 3} more" if len(holders) > 3 else "")
        return f"GPU {self.devices.names[i]}: {self.free(i):g} free" + (
            f", held by {shown}" if holders else ""
        )
