"""A small discrete-event model of batchwire: replicas x workers x trainers.

Plain Python (a heap of timed events). A batch is a chain of CPU tasks, each
holding a slot of the process that runs it and a core of the machine that
process lives on:

    build   a worker of the stream's replica      (cost ``Costs.build``)
    serve   the replica's gRPC process, 1 slot    (``Costs.serve``: frame + send)
    wire    the replica machine's NIC, if any     (bytes / NIC bytes/s; holds no core)
    receive the trainer's process, 1 slot         (``Costs.receive``: receive + decode)

A stream keeps ``prefetch`` batches built or building ahead of what it has
sent (the server's ``prefetch_batches``), and at most ``window`` batches sent
but not yet received (HTTP/2 flow control): 2 lets the server send one batch
while the trainer decodes the one before, which is what one stream here does
(benchmarks/RESULTS.md section 1: one stream keeps both cores busy).
Every process of one machine draws on that machine's cores, shared as the
kernel's scheduler shares them: n running tasks on c cores each progress at
min(1, c / n) of a core (processor sharing), so a short send is never stuck
behind a long build. Other tenants of a shared machine are ``background`` threads that
are always runnable and get their fair share like any other.
Process slots are handed out in arrival order.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace


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
    # Other tenants' threads, always runnable: they take their fair share of the cores
    # (the kernel shares cores per thread, not per tenant).
    background: float = 0.0
    nic_bytes_per_s: float | None = None  # None: loopback (costs CPU only, in serve/receive)


@dataclass(frozen=True)
class Topology:
    replicas: int
    workers: int  # per replica
    trainers: int
    streams: int = 1  # per trainer
    prefetch: int = 4
    window: int = 2  # batches in flight between a stream's server and its trainer
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


class _Cores:
    """A machine's cores, shared equally by the tasks running on it (processor sharing)."""

    def __init__(self, sim: _Sim, machine: Machine) -> None:
        self.sim = sim
        self.cores = machine.cores
        self.background = machine.background
        self.others = 0.0  # CPU seconds the background threads got
        self.running: list[list] = []  # [CPU seconds left, then]
        self.since = 0.0
        self.version = 0

    def _speed(self) -> float:
        """Of a core, what each running thread (ours or the background's) gets."""
        threads = len(self.running) + self.background
        return min(1.0, self.cores / threads) if threads else 0.0

    def _advance(self) -> None:
        done = (self.sim.now - self.since) * self._speed()
        self.others += done * self.background
        for task in self.running:
            task[0] -= done
        self.since = self.sim.now

    def _schedule(self) -> None:
        self.version += 1
        if self.running:
            version = self.version
            left = min(task[0] for task in self.running)
            self.sim.at(max(0.0, left) / self._speed(), lambda: self._finish(version))

    def run(self, seconds: float, then: Callable[[], None]) -> None:
        self._advance()
        self.running.append([seconds, then])
        self._schedule()

    def _finish(self, version: int) -> None:
        if version != self.version:
            return  # the set of running tasks changed since: a later event decides
        self._advance()
        finished = [task for task in self.running if task[0] <= 1e-12]
        self.running = [task for task in self.running if task[0] > 1e-12]
        self._schedule()
        for task in finished:
            task[1]()


class _Host:
    def __init__(self, sim: _Sim, machine: Machine) -> None:
        self.cores = _Cores(sim, machine)
        self.nic = _Pool(1) if machine.nic_bytes_per_s else None
        self.nic_rate = machine.nic_bytes_per_s or 0.0


class _Model:
    def __init__(self, costs: Costs, topology: Topology, warmup: float) -> None:
        self.sim = _Sim()
        self.costs = costs
        self.top = topology
        self.warmup = warmup
        self.received = 0
        shared = _Host(self.sim, topology.shared) if topology.shared else None
        self.replica_hosts = [
            shared or _Host(self.sim, topology.replica_machine) for _ in range(topology.replicas)
        ]
        self.trainer_hosts = [
            shared or _Host(self.sim, topology.trainer_machine) for _ in range(topology.trainers)
        ]
        self.workers = [_Pool(topology.workers) for _ in range(topology.replicas)]
        self.servers = [_Pool(1) for _ in range(topology.replicas)]
        self.clients = [_Pool(1) for _ in range(topology.trainers)]
        self.served = [0] * topology.replicas

    def _task(self, slots: _Pool, host: _Host, seconds: float, then: Callable[[], None]) -> None:
        """Holds a slot of ``slots`` while running ``seconds`` of CPU on ``host``'s cores."""

        def done() -> None:
            slots.release()
            then()

        slots.acquire(lambda: host.cores.run(seconds, done))

    def _stream(self, trainer: int, replica: int) -> None:
        # ahead: built or building, not yet sent; in_flight: sent (or sending), not received
        state = {"ahead": 0, "built": 0, "in_flight": 0, "sending": False}
        window = self.top.window
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
            if state["built"] and state["in_flight"] < window and not state["sending"]:
                state["built"] -= 1
                state["in_flight"] += 1
                state["sending"] = True
                self._task(self.servers[replica], r_host, c.serve, sent)

        def sent() -> None:
            state["sending"] = False
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
            send()  # the next one, if the window allows

        def wired() -> None:
            self._task(self.clients[trainer], t_host, c.receive, received)

        def received() -> None:
            if self.sim.now >= self.warmup:
                self.received += 1
            state["in_flight"] -= 1
            send()

        fill()

    def run(self, duration: float) -> dict[str, float]:
        top = self.top
        for t in range(top.trainers):
            for s in range(top.streams):
                self._stream(t, (t * top.streams + s) % top.replicas)
        hosts = {id(h.cores): h.cores for h in self.replica_hosts + self.trainer_hosts}
        self.sim.run(self.warmup)
        for cores in hosts.values():
            cores._advance()
        others = sum(cores.others for cores in hosts.values())
        self.sim.run(self.warmup + duration)
        for cores in hosts.values():
            cores._advance()
        batches_per_s = self.received / duration
        return {
            "batches_per_s": batches_per_s,
            "mb_per_s": batches_per_s * self.costs.batch_bytes / 1e6,
            "served_per_replica": list(self.served),
            "others_cores": (sum(c.others for c in hosts.values()) - others) / duration,
        }


def predict(
    costs: Costs, topology: Topology, *, duration: float = 20.0, warmup: float = 2.0
) -> dict[str, float]:
    """Throughput of ``topology`` in steady state (simulated ``duration`` after ``warmup``).

    ``others_cores``: what the background threads got meanwhile (cores, on average).
    """
    return _Model(costs, topology, warmup).run(duration)


def background_for(
    others_cores: float, costs: Costs, topology: Topology, machine: Machine, **run: float
) -> float:
    """The background threads on ``machine`` (shared by everything) under which the model's
    other tenants get ``others_cores``, as measured (bisection: more threads, more cores)."""
    low, high = 0.0, 64.0
    for _ in range(12):
        middle = (low + high) / 2
        shared = replace(machine, background=middle)
        got = predict(costs, replace(topology, shared=shared), **run)["others_cores"]
        low, high = (middle, high) if got < others_cores else (low, middle)
    return (low + high) / 2
