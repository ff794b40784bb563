"""A small discrete-event model of batchwire: replicas x workers x trainers.

Plain Python (a heap of timed events). A batch is a chain of CPU tasks, each
holding a slot of the process that runs it and a core of the machine that
process lives on:

    build   a worker of the stream's replica      (cost ``Costs.build``)
    serve   the replica's gRPC process, 1 slot    (``Costs.serve``: frame + send)
    wire    the replica machine's NIC, if any     (bytes / NIC bytes/s; holds no core)
    receive the trainer's process, 1 slot         (``Costs.receive``: receive + decode)

A stream keeps ``prefetch`` batches built or building ahead of what it has
sent (the server's ``prefetch_batches``), and at most one batch sent but not
yet received (HTTP/2 flow control: its window is smaller than these batches).
Every process of one machine draws on that machine's cores; a machine whose
cores are partly taken by others (other tenants of a shared host) runs each
task slower by ``cores / available``. Slots and cores are handed out in
arrival order, which for many short tasks gives the same throughput as the
kernel's time sharing.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Costs:
    """CPU seconds per batch of one pipeline (measured), and its payload bytes."""

    build: float
    serve: float
    receive: float
    batch_bytes: int


@dataclass(frozen=True)
class Machine:
    cores: int
    available: float | None = None  # cores left to us (others' load); None: all of them
    nic_bytes_per_s: float | None = None  # None: loopback (costs CPU only, in serve/receive)

    @property
    def slowdown(self) -> float:
        return self.cores / self.available if self.available else 1.0


@dataclass(frozen=True)
class Topology:
    replicas: int
    workers: int  # per replica
    trainers: int
    streams: int = 1  # per trainer
    prefetch: int = 4
    shared: Machine | None = None  # everything on this one machine (the validation here)
    replica_machine: Machine = Machine(cores=2)  # else: one machine per replica ...
    trainer_machine: Machine = Machine(cores=8)  # ... and one per trainer
    spread: str = "round_robin"  # stream s of trainer t -> replica (t * streams + s) mod R


class _Sim:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (self.now + delay, next(self._seq), action))

    def run(self, until: float) -> None:
        while self._events and self._events[0][0] <= until:
            self.now, _, action = heapq.heappop(self._events)
            action()
        self.now = until


class _Pool:
    """``size`` identical slots, handed out first come, first served."""

    def __init__(self, size: int) -> None:
        self.free = size
        self.waiting: deque[Callable[[], None]] = deque()

    def acquire(self, then: Callable[[], None]) -> None:
        if self.free:
            self.free -= 1
            then()
        else:
            self.waiting.append(then)

    def release(self) -> None:
        if self.waiting:
            self.waiting.popleft()()
        else:
            self.free += 1


class _Host:
    def __init__(self, machine: Machine) -> None:
        self.cores = _Pool(machine.cores)
        self.slowdown = machine.slowdown
        self.nic = _Pool(1) if machine.nic_bytes_per_s else None
        self.nic_rate = machine.nic_bytes_per_s or 0.0


class _Model:
    def __init__(self, costs: Costs, topology: Topology, warmup: float) -> None:
        self.sim = _Sim()
        self.costs = costs
        self.top = topology
        self.warmup = warmup
        self.received = 0
        shared = _Host(topology.shared) if topology.shared else None
        self.replica_hosts = [
            shared or _Host(topology.replica_machine) for _ in range(topology.replicas)
        ]
        self.trainer_hosts = [
            shared or _Host(topology.trainer_machine) for _ in range(topology.trainers)
        ]
        self.workers = [_Pool(topology.workers) for _ in range(topology.replicas)]
        self.servers = [_Pool(1) for _ in range(topology.replicas)]
        self.clients = [_Pool(1) for _ in range(topology.trainers)]
        self.served = [0] * topology.replicas

    def _task(self, slots: _Pool, host: _Host, seconds: float, then: Callable[[], None]) -> None:
        """Holds a slot of ``slots`` and a core of ``host`` for ``seconds`` of CPU."""

        def with_slot() -> None:
            def with_core() -> None:
                def done() -> None:
                    host.cores.release()
                    slots.release()
                    then()

                self.sim.at(seconds * host.slowdown, done)

            host.cores.acquire(with_core)

        slots.acquire(with_slot)

    def _stream(self, trainer: int, replica: int) -> None:
        state = {"ahead": 0, "built": 0, "in_flight": 0}
        r_host, t_host = self.replica_hosts[replica], self.trainer_hosts[trainer]
        c = self.costs

        def fill() -> None:
            while state["ahead"] < self.top.prefetch:
                state["ahead"] += 1
                self._task(self.workers[replica], r_host, c.build, built)

        def built() -> None:
            state["built"] += 1
            send()

        def send() -> None:
            if state["built"] and not state["in_flight"]:
                state["built"] -= 1
                state["in_flight"] = 1
                self._task(self.servers[replica], r_host, c.serve, sent)

        def sent() -> None:
            state["ahead"] -= 1
            self.served[replica] += 1
            fill()
            if r_host.nic is not None:
                nic = r_host.nic
                nic.acquire(
                    lambda: self.sim.at(
                        c.batch_bytes / r_host.nic_rate, lambda: (nic.release(), wired())
                    )
                )
            else:
                wired()

        def wired() -> None:
            self._task(self.clients[trainer], t_host, c.receive, received)

        def received() -> None:
            if self.sim.now >= self.warmup:
                self.received += 1
            state["in_flight"] = 0
            send()

        fill()

    def run(self, duration: float) -> dict[str, float]:
        top = self.top
        for t in range(top.trainers):
            for s in range(top.streams):
                self._stream(t, (t * top.streams + s) % top.replicas)
        self.sim.run(self.warmup + duration)
        batches_per_s = self.received / duration
        return {
            "batches_per_s": batches_per_s,
            "mb_per_s": batches_per_s * self.costs.batch_bytes / 1e6,
            "served_per_replica": [n for n in self.served],
        }


def predict(
    costs: Costs, topology: Topology, *, duration: float = 20.0, warmup: float = 2.0
) -> dict[str, float]:
    """Throughput of ``topology`` in steady state (simulated ``duration`` after ``warmup``)."""
    return _Model(costs, topology, warmup).run(duration)
