"""Fuzzing of everything that reads bytes from a peer.

Two layers: property-based tests of the pure framing and parsing functions
(any input gives a value or ``ProtocolError`` -- never another exception,
and every well-formed value survives a round trip), then a flood of
thousands of hostile connections against a live dispatcher and runner,
after which both must still work, hold no leaked threads or memory, and
have written nothing they should not have."""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ci.dispatch import server
import helpers
from ci import results
from support.cluster import send_slowly, wait_until
from ci.outcome import RESULT_INT_FIELDS
from ci.results import VERDICTS
from ci.security import NonceCache
from ci.wire import (Freshness, Message, ProtocolError, Reply, decode_fields, decode_header,
    decode_message, encode_fields, encode_frame, encode_message, one_line, read_frame,
    valid_full_commit, verify_frame)

SECRET = b"fuzzing secret"
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# What a command name or field key may be, written independently of the
# character loops ci/wire.py checks them with (so the two are compared).
COMMAND_RE = re.compile(r"(?=.{1,32}$)[a-z_](?:[a-z_-]*[a-z_])?")

# Pieces that look like parts of a header, so that random combinations
# reach the deeper checks instead of failing on the magic word.
HEADER_TOKENS = [b"CI1", b"CI2", b"ci1", b"0", b"12", b"-1", b"99999999999999", b"1e3",
                 b"1700000000.123", b"1.", b".5", b"1700000000.1234567", b"abcdef12",
                 b"ABCDEF12", b"abc", b"a" * 64, b"a" * 65, b"-", b"--", b"f" * 64,
                 b"\xff", b"\x00", b"", b"\t", "٣".encode()]
header_lines = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(st.sampled_from(HEADER_TOKENS), st.binary(max_size=8)),
             max_size=7).map(b" ".join),
)

# Values that have broken naive integer and number parsing before.
FIELD_VALUES = ["0", "1", "-1", "--1", "²", "٣", "1_000", " 1", "1 ", "", "nan", "inf",
                "-inf", "1e400", "9" * 13, "9" * 12, "0x10", "passed", "failed", "error",
                "timeout", "PASSED", "é", "\u2028", "1.5"]
field_dicts = st.dictionaries(
    st.one_of(st.sampled_from(results.RESULT_FIELDS), st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
              st.sampled_from(["vérdict", "Verdict", "tests "])),
    st.one_of(st.sampled_from(FIELD_VALUES), st.text(max_size=20)),
    max_size=12)


# --------------------------------------------------------------------------
# Pure functions: only ProtocolError (or Reply), whatever the input.

@FUZZ
@given(header_lines, st.integers(min_value=0, max_value=1 << 40))
def test_decode_header_raises_only_protocol_error(line, max_message):
    try:
        header = decode_header(line, max_message)
    except ProtocolError:
        return
    assert 0 <= header.length <= max_message
    assert header.tag == "-" or len(header.tag) == 64


@FUZZ
@given(st.one_of(st.binary(max_size=400),
                 st.tuples(st.sampled_from([b"status", b"results", b"dispatch", b"x" * 33, b"",
                                            b"St", b"a-b", b"\xff"]),
                           st.sampled_from([b"", b":", b":arg", b": \x00", b":\x7f", b":\xe9"]),
                           st.sampled_from([b"", b"\n", b"\nbody\n\n", b"\r\n"]),
                           st.binary(max_size=50)).map(b"".join)))
def test_decode_message_raises_only_protocol_error(payload):
    try:
        message = decode_message(payload)
    except ProtocolError:
        return
    assert COMMAND_RE.fullmatch(message.command)
    assert message.argument.isascii() and message.argument.isprintable()


@FUZZ
@given(st.from_regex(r"[a-z_]{1,32}", fullmatch=True),
       st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=200),
       st.binary(max_size=2000))
def test_message_round_trip(command, argument, body):
    decoded = decode_message(encode_message(command, argument, body))
    assert decoded == Message(command, argument, body)


@FUZZ
@given(st.one_of(st.binary(max_size=500),
                 st.lists(st.one_of(st.text(max_size=30),
                                    st.tuples(st.from_regex(r"[a-zA-Z_ ]{0,33}", fullmatch=True),
                                              st.sampled_from([": ", ":", " : ", ""]),
                                              st.text(max_size=20)).map("".join)),
                          max_size=80).map(lambda lines: "\n".join(lines).encode("utf-8",
                                                                                 "surrogatepass"))))
def test_decode_fields_raises_only_protocol_error(data):
    try:
        fields = decode_fields(data)
    except ProtocolError:
        return
    assert len(fields) <= 64
    assert all(COMMAND_RE.fullmatch(key) for key in fields)


@FUZZ
@given(st.dictionaries(st.from_regex(r"[a-z_]{1,32}", fullmatch=True), st.text(max_size=80),
                       max_size=64))
def test_fields_round_trip(fields):
    assert decode_fields(encode_fields(fields)) == \
        {key: one_line(value) for key, value in fields.items()}


@FUZZ
@given(st.binary(max_size=1000))
def test_parse_result_raises_only_protocol_error(data):
    try:
        fields, output = results.parse_result(data)
    except ProtocolError:
        return
    assert output in data


@FUZZ
@given(field_dicts, st.binary(max_size=3000))
def test_result_file_round_trip(fields, output):
    """Whatever the runner puts in the fields or the output (including
    ``\\n\\n`` and ``verdict: passed`` in the output), the header and the
    output come back apart and intact."""
    fields = {key: value for key, value in fields.items() if key in results.RESULT_FIELDS}
    parsed, parsed_output = results.parse_result(results.format_result(fields, output))
    assert parsed == {key: one_line(value) for key, value in fields.items()}
    assert parsed_output == output


def _results_body(fields: dict, output: bytes) -> bytes:
    lines = "".join(f"{key}: {value}\n" for key, value in fields.items())
    return lines.encode("utf-8", "surrogatepass") + b"\n" + output


@FUZZ
@given(st.one_of(st.text(max_size=120),
                 st.tuples(st.sampled_from([COMMIT, COMMIT[:39], COMMIT.upper(), "../" + COMMIT,
                                            COMMIT + "/..", "a" * 64, "", "/etc/passwd"]),
                           st.sampled_from([" 1", " 12ab", " ", " 1 2", " ../x", " a/b", " é",
                                            " " + "9" * 41, ""])).map("".join)),
       st.one_of(st.binary(max_size=300), st.tuples(field_dicts, st.binary(max_size=100))
                 .map(lambda args: _results_body(*args))))
def test_parse_results_message_raises_only_reply(argument, body):
    try:
        commit, _, outcome = server.parse_results_message(
            Message("results", argument, body))
    except Reply as exc:
        # The reason goes back on the reply's ASCII command line.
        decode_message(encode_message("error", exc.text))
        return
    assert valid_full_commit(commit)
    fields = outcome.header
    assert fields["verdict"] in VERDICTS
    assert all(isinstance(fields[name], int) for name in RESULT_INT_FIELDS)
    float(fields["duration"])
    assert outcome.output in body


# --------------------------------------------------------------------------
# read_frame over a real socket pair.

def _through_socketpair(data: bytes, max_message: int = 100_000, timeout: float = 5.0):
    """Write ``data`` (from a thread: it may exceed the socket buffer),
    close the writing side and read one frame from the other end."""
    left, right = socket.socketpair()
    with left, right:
        def write():
            try:
                left.sendall(data)
                left.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the reader gave up early, as it should on junk
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            return read_frame(right, max_message, timeout)
        finally:
            right.close()
            writer.join(5)


frames = st.one_of(
    st.binary(max_size=600),
    st.tuples(header_lines, st.sampled_from([b"\n", b""]), st.binary(max_size=200)).map(b"".join),
    st.tuples(st.binary(max_size=300), st.integers(0, 400)).map(
        lambda args: encode_frame(args[0])[:args[1]]),
)


@FUZZ
@given(frames)
def test_read_frame_raises_only_protocol_error(data):
    try:
        header, payload = _through_socketpair(data)
    except ProtocolError:
        return
    assert len(payload) == header.length <= 100_000


@FUZZ
@given(st.binary(max_size=300_000), st.sampled_from([None, SECRET]))
def test_frame_round_trip_over_socket(payload, secret):
    header, received = _through_socketpair(encode_frame(payload, secret),
                                           max_message=1 << 20)
    assert received == payload
    verify_frame(header, received, secret, fresh=Freshness(nonces=NonceCache()))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.data())
def test_any_changed_byte_of_a_signed_frame_is_refused(payload, data):
    frame = bytearray(encode_frame(payload, SECRET))
    position = data.draw(st.integers(0, len(frame) - 1), label="position")
    flip = data.draw(st.integers(1, 255), label="xor")
    frame[position] ^= flip
    with pytest.raises(ProtocolError):
        header, received = _through_socketpair(bytes(frame), timeout=2)
        verify_frame(header, received, SECRET, fresh=Freshness(nonces=NonceCache()))


def test_header_claiming_a_huge_length_is_refused_before_reading_it():
    started = time.monotonic()
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        _through_socketpair(b"CI1 999999999999 1700000000.0 abcdef12 -\n" + b"x" * 10,
                            max_message=1 << 20)
    assert time.monotonic() - started < 2


# --------------------------------------------------------------------------
# The live flood.

def proc_status(pid: int) -> dict[str, int]:
    """Threads and resident memory (kB) of a process, from /proc."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("Threads", "VmRSS"):
                values[key] = int(value.split()[0])
    return values


def snapshot(root) -> dict[str, tuple[int, int]]:
    found = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                stat = os.lstat(path)
            except FileNotFoundError:
                continue
            found[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
    return found


def unexpected_changes(before: dict, after: dict) -> list[str]:
    """Changed, new or removed files outside the places the daemons own:
    the results and state folders, the clones' .git, and the daemons' logs."""
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}

    def allowed(path: str) -> bool:
        parts = path.split(os.sep)
        if parts[0] in ("test_results", "dispatcher_state"):
            return True
        if parts[0].startswith(("runner-", "observer-")) and len(parts) > 1 \
                and parts[1] == ".git":
            return True
        return len(parts) == 1 and path.endswith(".log") and path in before
    return sorted(p for p in changed if not allowed(p))


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data``, half-close, and return everything the server sent."""
    chunks = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # refused mid-send: read what it said before closing
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError:
        pass
    return b"".join(chunks)


def reply_of(raw: bytes) -> Message | None:
    if not raw:
        return None
    line, _, payload = raw.partition(b"\n")
    header = decode_header(line)
    assert header.length == len(payload), raw[:200]
    return decode_message(payload)


def hostile_messages(rng: random.Random, commands: list[str], count: int) -> list[bytes]:
    """Malformed, truncated, oversized and binary requests; none of them a
    valid request that changes state."""
    ts = b"%.3f" % time.time()

    def frame(payload: bytes) -> bytes:
        return encode_frame(payload)

    def junk_argument() -> bytes:
        return rng.choice([b"", b":", b":" + rng.randbytes(rng.randint(1, 80)),
                           b":$(touch MARKER)", b":../../etc/passwd", b":" + b"a" * 70_000,
                           b": ;touch MARKER", b":\xff\xfe", b":" + b"g" * 40 + b" 1"])

    makers = [
        lambda: rng.randbytes(rng.randint(0, 3000)),
        lambda: b"CI1 " + b" ".join(rng.choice(HEADER_TOKENS) for _ in range(rng.randint(0, 6)))
        + b"\n" + rng.randbytes(rng.randint(0, 100)),
        lambda: frame(rng.randbytes(rng.randint(1, 500)))[:rng.randint(0, 120)],
        lambda: b"CI1 %d %s abcdef12 -\n" % (rng.choice([10 ** 9, 10 ** 11, 999999999999]), ts),
        lambda: b"CI1 %d %s abcdef12 -\n" % (rng.randint(1000, 200_000), ts)
        + rng.randbytes(rng.randint(0, 500)),
        lambda: b"CI1 " + b"9" * rng.randint(200, 2000),
        lambda: frame(rng.randbytes(rng.randint(0, 2000))),
        lambda: frame(rng.choice(commands).encode() + junk_argument()
                      + rng.choice([b"", b"\n", b"\n" + rng.randbytes(200)])),
        lambda: frame(b"results:" + COMMIT.encode() + b" 1\n" + rng.choice(
            [b"verdict: maybe\n\nout", b"verdict: passed\ntests: --1\n\nout",
             b"verdict: passed\ntests: \xc2\xb2\n\n", b"v\xc3\xa9rdict: passed\n\nx",
             b"verdict: passed\nduration: nan\n\n", b"no separator", b"\xff\xff\n\n"])),
        lambda: frame(b"register:" + rng.choice([b"", b"x", b"127.0.0.1:0", b"127.0.0.1:99999",
                                                 b"[::1", b"host name:1", b"a:b:c"])),
        lambda: frame(b"runtest:" + rng.choice([b"", b"xyz 1", b"aaa 1", b"a" * 65 + b" 1",
                                                b"aaaa ../1", b"aaaa 1 2", b"aaaa"])),
    ]
    return [rng.choice(makers)() for _ in range(count)]


def dribble(port: int, results: list, delay: float = 0.2, limit: float = 6.0) -> None:
    """Send a valid-looking frame one byte at a time until the server
    closes the connection; record when it answered and what it said."""
    data = b"CI1 100 %.3f abcdef12 -\n" % time.time() + b"x" * 100
    answered, _, reply = send_slowly(port, [bytes([b]) for b in data], delay, limit)
    results.append((answered, reply))


def test_live_daemons_survive_a_flood_of_hostile_messages(cluster, upstream, tmp_path):
    read_timeout = 1.0
    limits = ["--read-timeout", str(read_timeout), "--max-message-size", str(4 << 20)]
    disp = cluster.start_dispatcher(*limits)
    runner = cluster.start_runner(*limits)
    cluster.start_observer()
    first = upstream.commit({"README": "before the flood\n"})
    assert cluster.result(first)["verdict"] == "passed"

    def settled(pid):
        before = proc_status(pid)["Threads"]
        time.sleep(0.3)  # two samples apart, so a ping in flight is not counted
        return min(before, proc_status(pid)["Threads"])
    base = {d.name: dict(proc_status(d.pid), Threads=settled(d.pid)) for d in (disp, runner)}
    before = snapshot(tmp_path)
    results_before = cluster.result_files()

    rng = random.Random(20240611)
    plan = [(cluster.dispatcher_port, m) for m in
            hostile_messages(rng, ["dispatch", "results", "register", "release", "status",
                                   "nosuch"], 1500)]
    plan += [(runner.port, m) for m in
             hostile_messages(rng, ["runtest", "ping", "nosuch"], 1500)]
    # A few large bodies that are read in full before being refused.
    for port in (cluster.dispatcher_port, runner.port):
        plan += [(port, encode_frame(b"nosuch\n" + b"\xff" * (3 << 20)))] * 3
    rng.shuffle(plan)

    dribbles: list = []
    dribblers = [threading.Thread(target=dribble, args=(port, dribbles), daemon=True)
                 for port in (cluster.dispatcher_port, runner.port) for _ in range(5)]
    for thread in dribblers:
        thread.start()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda item: exchange(*item), plan))
    flood_time = time.monotonic() - started
    for thread in dribblers:
        thread.join(10)

    assert len(plan) > 3000 and flood_time < 30, flood_time
    answered = [reply_of(raw) for raw in replies if raw]
    # Junk that the server refuses mid-send may be answered by a reset.
    assert len(answered) > len(plan) * 0.8, len(answered)
    # Nothing hostile is ever accepted; an occasional well-formed status or
    # ping in the random mix is answered ok, anything else is refused.
    assert {m.command for m in answered} <= {"error", "ok"}
    assert all(m.argument == "pong" or m.body.startswith(b"queued")
               for m in answered if m.command == "ok")
    # Dribblers are cut off at the read timeout, not after their last byte.
    assert len(dribbles) == 10
    for answered, raw in dribbles:
        # (a dribbler sends for 6 s: the slack is for a busy machine's
        # late handler thread, under this flood on two cores)
        assert answered is not None and answered < read_timeout + 3.5, dribbles
        assert reply_of(raw).argument == "timed out reading message"

    for daemon in (disp, runner):
        assert daemon.alive(), daemon.log()[-3000:]
        wait_until(lambda: proc_status(daemon.pid)["Threads"] <= base[daemon.name]["Threads"] + 2,
                   15, what=f"{daemon.name} threads back to {base[daemon.name]}")
        rss = proc_status(daemon.pid)["VmRSS"]
        # The tolerance is for malloc arenas that keep the big bodies' pages.
        assert rss < base[daemon.name]["VmRSS"] + 40 * 1024, (daemon.name, base, rss)
        assert "Traceback" not in daemon.log() and "internal error" not in daemon.log()
    status = decode_fields(helpers.call(("127.0.0.1", cluster.dispatcher_port),
                                                "status").body)
    assert (status["queued"], status["running"], status["runners"], status["done"]) == \
        ("0", "0", "1", str(len(results_before)))
    assert unexpected_changes(before, snapshot(tmp_path)) == []
    assert cluster.result_files() == results_before

    after = upstream.commit({"README": "after the flood\n"})
    assert cluster.result(after)["verdict"] == "passed"
