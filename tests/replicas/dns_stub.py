"""A tiny DNS server on loopback: one name, a list of IPv4 addresses that a test can change.

gRPC's ``dns`` resolver takes a DNS server in the target's authority
(``dns://127.0.0.1:5353/replicas.test:50051``), so a channel to that name
re-resolves against this server, as a trainer's channel re-resolves a
Kubernetes headless Service: replicas that join are found without root or
/etc/hosts edits. Replicas listen on 127.0.0.x (all of 127/8 is loopback on
Linux) and share one port, as pods of a Deployment do.

Answers A queries for ``name`` with ``addresses`` (TTL 0); any other name or
type gets an empty answer (NOERROR) so that AAAA, SRV and TXT look-ups end at once.
"""

from __future__ import annotations

import socket
import struct
import threading


class DnsStub:
    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name.lower().rstrip(".")
        self.addresses = list(addresses)
        self.queries = 0  # A queries for `name` answered (each is one re-resolution)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="dns-stub", daemon=True)
        self._thread.start()

    def target(self, port: int) -> str:
        """The gRPC target naming ``self.name:port``, resolved by this server."""
        return f"dns://127.0.0.1:{self.port}/{self.name}:{port}"

    def close(self) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self._sock.recvfrom(4096)
            except OSError:
                return  # closed
            try:
                answer = self._answer(query)
            except (ValueError, struct.error, IndexError):
                continue  # not a query we understand: no answer
            try:
                self._sock.sendto(answer, peer)
            except OSError:
                return

    def _answer(self, query: bytes) -> bytes:
        ident, flags = struct.unpack("!HH", query[:4])
        labels, at = [], 12
        while query[at]:
            length = query[at]
            labels.append(query[at + 1 : at + 1 + length].decode("ascii").lower())
            at += 1 + length
        qtype, qclass = struct.unpack("!HH", query[at + 1 : at + 5])
        question = query[12 : at + 5]
        records = b""
        count = 0
        if ".".join(labels) == self.name and qtype == 1 and qclass == 1:
            self.queries += 1
            for address in list(self.addresses):
                # A pointer to the question's name, type A, class IN, TTL 0, 4 bytes.
                records += struct.pack("!HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(address)
                count += 1
        reply_flags = 0x8400 | (flags & 0x0100) | 0x0080  # QR, AA, RD as asked, RA
        return struct.pack("!HHHHHH", ident, reply_flags, 1, count, 0, 0) + question + records
