"""Load generator: many lightweight fake test runners in ONE process.

Each fake runner is a real listening socket on loopback that speaks the real
protocol (frames, HMAC, nonces: all through ``helpers``): it registers with
the dispatcher, answers ``ping`` and ``runtest`` at once, and for every
accepted job posts a ``results`` message back: a small one, or with
``--records N`` one with N per-test records and their JUnit XML, the body a
real runner sends (``Outcome.to_body``).  No tests are run, so what is
measured is the dispatcher alone.  asyncio keeps hundreds of
runners cheap enough that the generator is not the bottleneck.

usage: fake_runners.py --dispatcher HOST:PORT [--count N] [--labels N] [--records N]

With ``--labels N`` each runner registers with N labels drawn at random
from a pool of 4 N (``l0``, ``l1``...) plus ``python3.12`` (matrix
routing's cost: every assignment checks a cell's needs against them).

Commands on stdin, one a line (answers are JSON lines on stdout):
  stats        counters so far
  latencies    the ms from sending each ``results`` until its reply, since
               the last ``latencies`` (then forgotten)
  kill N       close N runners' ports (a crashed process: connection refused)
  freeze N     N runners accept but never answer (a hung process)
  quit         stop
The secret, if any, comes from ``CI_SECRET`` as for the daemons.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ci import junit_xml
from ci import results  # noqa: E402
from ci.outcome import Outcome  # noqa: E402
from ci.security import NonceCache, load_credentials  # noqa: E402
from ci.wire import (FrameHeader, Freshness, MAX_HEADER_BYTES, ProtocolError, decode_header,
    decode_message, encode_fields, encode_frame, encode_message, format_address, parse_address,
    verify_frame)

# Concurrent connections to the dispatcher, well under its --max-connections.
MAX_IN_FLIGHT = 64
# A message that cannot be delivered after this many tries counts as failed.
MAX_TRIES = 50
IO_TIMEOUT = 10.0
# The generator ends by itself even if nobody tells it to.
DEFAULT_LIFETIME = 900.0


class Counters:
    def __init__(self):
        self.pings = 0
        self.runtests = 0
        self.busy = 0
        self.results_ok = 0
        self.results_duplicate = 0
        self.results_failed = 0
        self.retries = 0
        self.bad_requests = 0


class FakeRunner:
    """One runner: a listening socket plus the job it holds, if any."""

    def __init__(self, fleet: "Fleet", labels: list[str] | None = None):
        self.fleet = fleet
        self.labels = labels or []
        self.instance = secrets.token_hex(8)
        self.server: asyncio.base_events.Server | None = None
        self.key = ""
        self.job: str | None = None
        self.frozen = False

    async def start(self, host: str) -> None:
        self.server = await asyncio.start_server(self.handle, host, 0, backlog=64)
        self.key = format_address(self.server.sockets[0].getsockname()[:2])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        fleet = self.fleet
        try:
            if self.frozen:
                # A hung process: the kernel accepted, nobody will ever answer.
                await asyncio.wait_for(reader.read(), timeout=IO_TIMEOUT * 6)
                return
            header, payload = await read_frame(reader)
            verify_frame(header, payload, fleet.secret, fresh=Freshness(nonces=fleet.nonces))
            message = decode_message(payload)
            if message.command == "ping":
                fleet.counters.pings += 1
                body = encode_fields({"instance": self.instance,
                                              "busy": self.job or ""})
                answer = encode_message("ok", "pong", body)
            elif message.command == "runtest":
                fleet.counters.runtests += 1
                commit, _, job_id = message.argument.partition(" ")
                if self.job is None:
                    self.job = commit
                    answer = encode_message("ok")
                    asyncio.get_running_loop().create_task(self.report(commit, job_id))
                else:
                    fleet.counters.busy += 1
                    answer = encode_message("busy", self.job)
            else:
                answer = encode_message("error", "unknown command")
            writer.write(encode_frame(answer, fleet.secret, reply_to=header.nonce))
            await writer.drain()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                ProtocolError):
            fleet.counters.bad_requests += 1
        finally:
            writer.close()

    async def report(self, commit: str, job_id: str) -> None:
        """Finish at once, like a runner whose suite is empty: free first,
        then deliver (the real runner frees itself before delivering too)."""
        body = self.fleet.body(self.key)
        self.job = None
        reply = await self.fleet.call("results", f"{commit} {job_id}", body)
        counters = self.fleet.counters
        if reply is None or reply.command != "ok":
            counters.results_failed += 1
        elif reply.argument == "duplicate":
            counters.results_duplicate += 1
        else:
            counters.results_ok += 1

    async def register(self) -> bool:
        fields = {"instance": self.instance, "busy": self.job or ""}
        if self.labels:
            fields["labels"] = " ".join(self.labels)
        body = encode_fields(fields)
        reply = await self.fleet.call("register", self.key, body)
        return reply is not None and reply.command == "ok"

    def kill(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


async def read_frame(reader: asyncio.StreamReader) -> tuple[FrameHeader, bytes]:
    line = await asyncio.wait_for(reader.readuntil(b"\n"), IO_TIMEOUT)
    if len(line) > MAX_HEADER_BYTES + 1:
        raise ProtocolError("header line too long")
    header = decode_header(line[:-1])
    payload = await asyncio.wait_for(reader.readexactly(header.length), IO_TIMEOUT)
    return header, payload


class Fleet:
    def __init__(self, dispatcher: tuple[str, int], secret: bytes | None):
        self.dispatcher = dispatcher
        self.secret = secret
        self.nonces = NonceCache()
        self.counters = Counters()
        self.runners: list[FakeRunner] = []
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.records: tuple[results.TestRecord, ...] = ()
        self.latencies: list[float] = []
        self.bodies: dict[str, bytes] = {}

    def body(self, runner: str) -> bytes:
        """A passing run's ``results`` body: with records (and their XML)
        when ``--records`` asked for them, as a real runner sends it; made
        once per runner, so the generator's own CPU stays small."""
        if runner not in self.bodies:
            self.bodies[runner] = self._make_body(runner)
        return self.bodies[runner]

    def _make_body(self, runner: str) -> bytes:
        fields = {"verdict": "passed", "tests": 1, "failures": 0, "errors": 0, "skipped": 0,
                  "runner": runner, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "duration": "0.001", "exit_code": 0}
        if not self.records:
            return results.format_result(fields, b"Ran 1 test in 0.001s\n\nOK\n")
        fields["tests"] = len(self.records)
        fields["skipped"] = sum(r.outcome == results.SKIPPED for r in self.records)
        xml = junit_xml.format_junit(list(self.records), name="fake")
        return Outcome(fields, b"Ran the tests\n\nOK\n", self.records, xml).to_body()

    async def call(self, command: str, argument: str, body: bytes = b""):
        """One request to the dispatcher, retried with a short backoff while
        it is unreachable or busy; None if it never got through."""
        payload = encode_message(command, argument, body)
        delay = 0.02
        sent = time.perf_counter()
        for attempt in range(MAX_TRIES):
            if attempt:
                self.counters.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            nonce = secrets.token_hex(12)
            frame = encode_frame(payload, self.secret, nonce=nonce)
            async with self.slots:
                writer = None
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(*self.dispatcher), IO_TIMEOUT)
                    writer.write(frame)
                    await writer.drain()
                    header, reply = await read_frame(reader)
                    verify_frame(header, reply, self.secret, reply_to=nonce)
                    message = decode_message(reply)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                        ProtocolError):
                    continue
                finally:
                    if writer is not None:
                        writer.close()
            if message.command == "error" and "busy" in message.argument:
                continue
            if command == "results":
                self.latencies.append(round((time.perf_counter() - sent) * 1000, 3))
            return message
        return None

    def stats(self) -> dict:
        data = dict(vars(self.counters))
        data["alive"] = sum(1 for r in self.runners if r.server and not r.frozen)
        return data


def emit(event: str, **data) -> None:
    sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


async def command_loop(fleet: Fleet, lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    deadline = loop.time() + lifetime
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            emit("timeout")
            return
        if not line:
            return
        words = line.decode().split()
        if not words:
            continue
        if words[0] == "quit":
            return
        if words[0] == "stats":
            emit("stats", **fleet.stats())
        elif words[0] == "latencies":
            emit("latencies", ms=fleet.latencies)
            fleet.latencies = []
        elif words[0] in ("kill", "freeze") and len(words) == 2 and words[1].isdigit():
            victims = [r for r in fleet.runners if r.server and not r.frozen][:int(words[1])]
            for runner in victims:
                if words[0] == "kill":
                    runner.kill()
                else:
                    runner.frozen = True
            emit(words[0], runners=[r.key for r in victims])
        else:
            emit("error", text=f"unknown command {line.decode().strip()!r}")


def fake_records(count: int) -> tuple[results.TestRecord, ...]:
    """``count`` per-test records of a passing suite: 50 modules, durations
    spread over 0-0.3 s, one in 20 skipped."""
    return tuple(results.TestRecord(
        f"tests.test_mod_{t % 50}.TestCase{t}", f"test_case_{t}",
        results.SKIPPED if t % 20 == 19 else results.PASSED, round(0.001 * (t % 300), 3),
        message="not on this platform" if t % 20 == 19 else "") for t in range(count))


async def main_async(args) -> int:
    fleet = Fleet(parse_address(args.dispatcher), load_credentials(None)[0])
    fleet.records = fake_records(args.records)
    pool = [f"l{i}" for i in range(4 * args.labels)]
    for _ in range(args.count):
        labels = random.sample(pool, args.labels) + ["python3.12"] if args.labels else []
        runner = FakeRunner(fleet, labels)
        await runner.start(args.host)
        fleet.runners.append(runner)
    registered = await asyncio.gather(*(r.register() for r in fleet.runners))
    emit("ready", runners=len(fleet.runners), registered=sum(registered))
    try:
        await command_loop(fleet, args.lifetime)
    finally:
        for runner in fleet.runners:
            runner.kill()
    emit("stats", **fleet.stats())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dispatcher", required=True, metavar="HOST:PORT")
    parser.add_argument("--count", type=int, default=200, help="runners (default: %(default)s)")
    parser.add_argument("--labels", type=int, default=0, metavar="N",
                        help="labels per runner, at random (default: none)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the runners listen on (default: %(default)s)")
    parser.add_argument("--lifetime", type=float, default=DEFAULT_LIFETIME,
                        help="exit after this many seconds regardless (default: %(default)s)")
    parser.add_argument("--records", type=int, default=0,
                        help="per-test records (and JUnit XML) in each result, as a real "
                             "runner sends them (default: %(default)s, a bare result)")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 2000:
        parser.error("--count must be 1-2000")
    if not 0 <= args.records <= 100_000:
        parser.error("--records must be 0-100000")
    if not 0 <= args.labels <= 16:
        parser.error("--labels must be 0-16")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
