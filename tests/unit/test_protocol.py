"""Pure functions of the protocol, tested without sockets: if framing,
signing or parsing is wrong, every daemon is wrong, so these round trips
carry the awkward inputs (colons, newlines, megabytes, bytes that are not
UTF-8).  The runner's judging is tests/unit/test_verdict.py, result files
tests/unit/test_results.py."""

from __future__ import annotations

import os
import socket
import time

import pytest
from hypothesis import given, settings, strategies as st

import ci.security
import helpers
from ci.security import NonceCache, boot_id
from ci.wire import (Busy, FrameHeader, Freshness, Message, ProtocolError, decode_fields,
    decode_header, decode_message, encode_fields, encode_frame, encode_message, format_address,
    parse_address, valid_commit, valid_full_commit, verify_frame)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRET = b"correct horse battery staple"
NOT_UTF8 = b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc\x80\x00"


def split_frame(frame: bytes) -> tuple[FrameHeader, bytes]:
    """What ``read_frame`` does on a socket, done on bytes."""
    line, sep, payload = frame.partition(b"\n")
    assert sep, "a frame has a header line"
    header = decode_header(line)
    assert header.length == len(payload)
    return header, payload


# --------------------------------------------------------------------------
# Messages.

@pytest.mark.parametrize("command, argument, body", [
    ("status", "", b""),
    ("ok", "pong", b""),
    ("register", "[::1]:8901", b"instance: abc\nbusy: \n"),
    ("results", f"{COMMIT} 7", b"verdict: passed\n\nresults:deadbeef 1\nok:x\n"),
    ("error", "unknown command 'x': try status", b""),
    ("dispatch", " ".join([COMMIT] * 3), b""),
    ("results", f"{COMMIT} 1", b"\n\n\nleading and trailing newlines\n\n"),
    ("results", f"{COMMIT} 1", NOT_UTF8 * 10),
    ("results", f"{COMMIT} 1", b"line\r\nwith\rcarriage returns and a NUL \0 byte"),
])
def test_message_round_trip(command, argument, body):
    assert decode_message(encode_message(command, argument, body)) == \
        Message(command, argument, body)


def test_message_round_trip_several_megabytes():
    body = (b"results:" + COMMIT.encode() + b" 1\n" + NOT_UTF8 + b"\n\n") * 200_000
    assert len(body) > 5_000_000
    message = decode_message(encode_message("results", f"{COMMIT} 3", body))
    assert message.command == "results"
    assert message.argument == f"{COMMIT} 3"
    assert message.body == body


@settings(max_examples=200, deadline=None, database=None)
@given(command=st.from_regex(r"[a-z_]{1,32}", fullmatch=True),
       argument=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
       body=st.binary(max_size=2000))
def test_message_round_trip_any_input(command, argument, body):
    decoded = decode_message(encode_message(command, argument, body))
    assert (decoded.command, decoded.argument, decoded.body) == (command, argument, body)


@pytest.mark.parametrize("command, argument", [
    ("Status", ""), ("", ""), ("a" * 33, ""), ("stat us", ""), ("ok!", ""),
    ("ok", "two\nlines"), ("ok", "nul\0"), ("ok", "cr\r"), ("ok", "caf\u00e9"),
])
def test_encode_message_refuses_bad_command_lines(command, argument):
    with pytest.raises(ProtocolError):
        encode_message(command, argument)


@pytest.mark.parametrize("payload", [
    b"", b"\n", b":arg", b"STATUS", b"stat us", b"status\t:x", b"ok:\x1b[31m",
    b"ok:\xff\xfe", b"caf\xc3\xa9", b"x" * 5000, b"a" * 33 + b":x",
])
def test_decode_message_refuses_malformed_payloads(payload):
    with pytest.raises(ProtocolError):
        decode_message(payload)


def test_decode_message_splits_on_first_colon_and_first_newline_only():
    message = decode_message(b"register:[::1]:80\nkey: a:b\n\nrest:of\nit")
    assert message == Message("register", "[::1]:80", b"key: a:b\n\nrest:of\nit")


# --------------------------------------------------------------------------
# Frames.

FRAME_PAYLOADS = {
    "command": b"status",
    "frame-inside-body": b"results:" + COMMIT.encode()
    + b" 1\nverdict: failed\n\nCI1 5 1.0 abcdefgh -\nhello",
    "not-utf8": NOT_UTF8 + b"\n\n\n" + NOT_UTF8,
    "6MB": (b"x: y\n" + NOT_UTF8) * 300_000,
}


@pytest.mark.parametrize("secret", [None, SECRET], ids=["unsigned", "signed"])
@pytest.mark.parametrize("name", list(FRAME_PAYLOADS))
def test_frame_round_trip(secret, name):
    payload = FRAME_PAYLOADS[name]
    frame = encode_frame(payload, secret)
    header, got = split_frame(frame)
    assert got == payload
    verify_frame(header, got, secret, fresh=Freshness(nonces=NonceCache()))
    assert (header.tag == "-") == (secret is None)


def test_reply_is_bound_to_its_request_nonce():
    frame = encode_frame(b"ok", SECRET, reply_to="aaaaaaaaaaaa")
    header, payload = split_frame(frame)
    verify_frame(header, payload, SECRET, reply_to="aaaaaaaaaaaa")
    with pytest.raises(ProtocolError, match="signature"):
        verify_frame(header, payload, SECRET, reply_to="bbbbbbbbbbbb")
    with pytest.raises(ProtocolError, match="signature"):
        verify_frame(header, payload, SECRET)


def test_verify_frame_refuses_tampering_and_wrong_keys():
    header, payload = split_frame(encode_frame(b"dispatch:" + COMMIT.encode(), SECRET))
    with pytest.raises(ProtocolError, match="signature"):
        verify_frame(header, payload.replace(b"0", b"1", 1), SECRET)
    with pytest.raises(ProtocolError, match="signature"):
        verify_frame(header, payload, b"another secret")
    unsigned_header, unsigned = split_frame(encode_frame(payload, None))
    with pytest.raises(ProtocolError, match="unsigned"):
        verify_frame(unsigned_header, unsigned, SECRET)
    # Without a secret configured nothing is checked at all.
    verify_frame(header, payload.replace(b"0", b"1", 1), None)


def test_verify_frame_refuses_stale_and_replayed_messages():
    frame = encode_frame(b"status", SECRET, now=1_000_000.0)
    header, payload = split_frame(frame)
    verify_frame(header, payload, SECRET, fresh=Freshness(30, now=1_000_029.0))
    with pytest.raises(ProtocolError, match="stale"):
        verify_frame(header, payload, SECRET, fresh=Freshness(30, now=1_000_031.0))
    with pytest.raises(ProtocolError, match="stale"):
        verify_frame(header, payload, SECRET, fresh=Freshness(30, now=999_969.0))
    nonces = NonceCache(window=30)
    verify_frame(header, payload, SECRET, fresh=Freshness(nonces=nonces, now=1_000_001.0))
    with pytest.raises(ProtocolError, match="replayed"):
        verify_frame(header, payload, SECRET, fresh=Freshness(nonces=nonces, now=1_000_002.0))


def test_nonce_cache_forgets_only_what_the_window_already_refuses():
    cache = NonceCache(window=10, limit=1000)
    assert cache.add("a" * 24, now=100.0)
    assert not cache.add("a" * 24, now=115.0)  # still remembered within 2 windows
    assert cache.add("b" * 24, now=200.0)  # old entries dropped, new one kept
    assert cache.add("a" * 24, now=200.5)
    small = NonceCache(window=10, limit=3)
    for i in range(10):
        assert small.add(f"{i:024x}", now=100.0)
    assert len(small._seen) <= 3


def test_persisted_nonces_outlive_the_cache_and_stay_bounded(tmp_path, monkeypatch):
    """Issue 17: a nonce seen before a restart is still refused after it;
    only the last two windows are kept, a torn last line is skipped, and
    the file is compacted once it is mostly dead entries."""
    path = str(tmp_path / "dispatcher-nonces")
    now = time.time()
    with open(path, "wb") as handle:  # an earlier run's file, killed mid-line
        handle.write(b"%.3f %s\n%.3f %s\n%.3f %s" % (
            now - 200, b"a" * 24, now - 5, b"b" * 24, now - 1, b"c" * 3))
    cache = NonceCache(window=30)
    cache.persist(path)
    assert not cache.add("b" * 24, now)  # seen before the "restart"
    assert cache.add("a" * 24, now)  # older than two windows: dropped (stale anyway)
    assert cache.add("d" * 24, now)
    cache.close()
    again = NonceCache(window=30)
    again.persist(path)
    assert not again.add("d" * 24, now + 1) and not again.add("a" * 24, now + 1)
    assert b"c" * 3 not in open(path, "rb").read()
    monkeypatch.setattr(ci.security, "NONCE_COMPACT_LINES", 100)
    for i in range(1000):  # each outlives the window by the next one
        assert again.add(f"{i:024x}", now + 100 * i)
    lines = open(path, "rb").read().count(b"\n")
    assert lines <= 200, lines
    again.close()


@pytest.mark.skipif(boot_id() is None, reason="no boot id on this system")
def test_after_a_machine_restart_frames_sent_before_it_wait_one_window(tmp_path):
    """Nonces are written without fsync, so a machine crash may lose the
    last ones: after a restart (a new boot id) frames stamped before the
    start are refused, as busy, for one window; later ones are served."""
    path = tmp_path / "dispatcher-nonces"
    path.write_bytes(b"boot 00000000-0000-0000-0000-000000000000\n")
    cache = NonceCache(window=30)
    cache.persist(str(path))
    now = time.time()
    with pytest.raises(Busy, match="restarted"):
        cache.add("f" * 24, now, sent=now - 10)
    assert cache.add("f" * 24, now, sent=now + 1)  # a clock a little ahead
    assert cache.add("e" * 24, now + 31, sent=now - 1)  # a window later: stale anyway
    cache.close()
    again = NonceCache(window=30)
    again.persist(str(path))  # the same boot: no restart, no refusal
    assert again.add("d" * 24, now, sent=now - 20)
    again.close()


def test_a_nonce_that_cannot_be_written_is_refused_for_now(tmp_path):
    """Accepting a nonce the file does not hold would let its frame be
    replayed after a restart: the sender is told busy instead."""
    cache = NonceCache(window=30)
    cache.persist(str(tmp_path / "runner-nonces"))
    os.close(cache._fd)
    cache._fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(Busy):
        cache.add("e" * 24, time.time())
    cache.close()


@pytest.mark.parametrize("line", [
    b"", b"CI1", b"CI2 5 1.0 abcdefgh -", b"CI1 5 1.0 abcdefgh", b"CI1 5 1.0 abcdefgh - x",
    b"CI1 -5 1.0 abcdefgh -", b"CI1 five 1.0 abcdefgh -", b"CI1 1234567890123 1.0 abcdefgh -",
    b"CI1 5 now abcdefgh -", b"CI1 5 1.0 ABCDEFGH -", b"CI1 5 1.0 abc -",
    b"CI1 5 1.0 abcdefgh xyz", b"CI1 5 1.0 abcdefgh " + b"a" * 63,
    b"CI1  5 1.0 abcdefgh -", b"CI1 5 1.0 abcdefgh -\r",
])
def test_decode_header_refuses_malformed_lines(line):
    with pytest.raises(ProtocolError):
        decode_header(line)


def test_decode_header_enforces_the_size_limit():
    line = encode_frame(b"x" * 1001, None).partition(b"\n")[0]
    assert decode_header(line, max_message=1001).length == 1001
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_header(line, max_message=1000)


# --------------------------------------------------------------------------
# Addresses and commit ids.

@pytest.mark.parametrize("text, expected", [
    ("localhost:8888", ("localhost", 8888)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    ("ci.example.org:65535", ("ci.example.org", 65535)),
    ("[::1]:8000", ("::1", 8000)),
    ("[fe80::1%eth0]:9", ("fe80::1%eth0", 9)),
    (":8900", ("localhost", 8900)),
])
def test_parse_address_accepts(text, expected):
    assert parse_address(text) == expected
    assert parse_address(format_address(expected)) == expected


@pytest.mark.parametrize("text", [
    "", "localhost", "localhost:", "localhost:0", "localhost:65536", "localhost:http",
    "localhost:-1", "local host:80", "a;rm -rf:80", "host:80\n", "h\u00f6st:80",
    "x" * 400 + ":80", None, 8080,
])
def test_parse_address_refuses(text):
    with pytest.raises(ValueError):
        parse_address(text)


@pytest.mark.parametrize("text, short_ok, full_ok", [
    (COMMIT, True, True),
    ("a" * 64, True, True),
    ("abcd", True, False),
    ("abc", False, False),
    ("a" * 65, False, False),
    (COMMIT.upper(), False, False),
    (COMMIT[:-1] + "g", False, False),
    (COMMIT + "\n", False, False),
    ("-" + COMMIT[1:], False, False),
    ("../" + COMMIT, False, False),
    ("", False, False),
    (None, False, False),
])
def test_valid_commit(text, short_ok, full_ok):
    assert valid_commit(text) is short_ok
    assert valid_full_commit(text) is full_ok


# --------------------------------------------------------------------------
# Fields.

def test_fields_round_trip_and_flatten_to_one_line():
    fields = {"verdict": "error", "reason": "a: b: c", "runner": "[::1]:8901",
              "tests": 3, "unicode": "caf\u00e9 \u2713", "empty": ""}
    decoded = decode_fields(encode_fields(fields))
    assert decoded == {k: str(v) for k, v in fields.items()}
    injected = decode_fields(encode_fields(
        {"reason": "first\nverdict: passed\r\n\x00\x1b[0m"}))
    assert list(injected) == ["reason"]
    assert "\n" not in injected["reason"] and "verdict: passed" in injected["reason"]


def test_decode_fields_accepts_numbered_keys():
    # The observer's status lists its branches as branch_0, branch_1, ...
    data = encode_fields({"polls": 3, "branch_0": f"main {COMMIT}", "branch_1": "x -"})
    assert decode_fields(data) == {"polls": "3", "branch_0": f"main {COMMIT}",
                                           "branch_1": "x -"}


@pytest.mark.parametrize("data", [
    b"no separator", b"Key: x", b"key:x", b"k-ey: x", b": x", b"0key: x", b"a" * 33 + b": x",
    NOT_UTF8 + b": x", b"k: " + NOT_UTF8,
])
def test_decode_fields_refuses_malformed(data):
    with pytest.raises(ProtocolError):
        decode_fields(data)


def test_decode_fields_caps_the_number_of_fields():
    data = b"".join(b"k%s: v\n" % bytes([97 + i]) for i in range(9))
    assert len(decode_fields(data)) == 9
    with pytest.raises(ProtocolError, match="too many"):
        decode_fields(data, max_fields=8)


# --------------------------------------------------------------------------
# Signing without hashlib.

@given(st.binary(min_size=1, max_size=200), st.lists(st.binary(max_size=300), max_size=5))
def test_own_hmac_equals_the_standard_library(key, parts):
    """wire signs with CPython's built-in SHA-256 when hashlib is not loaded
    (a hook's fast start): the tag must be exactly hmac's."""
    import hashlib
    import hmac
    from ci import wire
    assert wire._hmac_sha256(key, parts) == \
        hmac.new(key, b"".join(parts), hashlib.sha256).hexdigest()


def test_records_take_their_last_fields_by_name():
    """``Limits``, ``Credentials`` and ``Freshness`` group what a call, a
    signature and a frame's age check take; named fields may be given."""
    from ci.wire import DEFAULT_AUTH_WINDOW, DEFAULT_MAX_MESSAGE, Credentials, Limits
    assert Limits(3, window=9) == (3, None, DEFAULT_MAX_MESSAGE, 9)
    assert Credentials() == (None, None) and Freshness(nonces=1).window == DEFAULT_AUTH_WINDOW
    with pytest.raises(TypeError):
        Limits(1, timeout=2)
    with pytest.raises(TypeError):
        Limits(bogus=1)


def test_a_call_waits_for_its_reply_as_long_as_the_timeout_pair_says():
    """``helpers.call``'s ``timeout``: one number (connect and reply, the
    reply at least the read timeout) or a (connect, reply) pair."""
    with socket.create_server(("127.0.0.1", 0)) as silent:   # accepts, never answers
        address = silent.getsockname()[:2]
        started = time.monotonic()
        with pytest.raises(ProtocolError, match="timed out"):
            helpers.call(address, "status", timeout=(5, 0.3))
        assert time.monotonic() - started < 3


def test_free_port_is_bindable_and_outside_the_range_outgoing_connections_use():
    """A port another process's outgoing connection cannot take between the
    probe and the daemon's bind (a cause of "Address already in use")."""
    low = helpers._ephemeral_low()
    ports = {helpers.free_port() for _ in range(20)}
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    if low - 1024 >= 4096:
        assert all(1024 <= p < low for p in ports), (low, ports)
    assert len(ports) > 1          # random, so two test workers seldom probe the same one
