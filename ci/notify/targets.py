"""Targets: how one event reaches one receiver, the notify command or a
webhook.  Each has ``deliver(event)``, which returns only once the receiver
confirmed (exit status 0, a 2xx answer) and raises ``DeliveryError``
otherwise, and ``abort()`` for a stopping dispatcher; a ``key`` that names
it in the journal and a ``label`` that names it in logs.  Retrying is the
worker's business, not theirs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from ci import procgroup
from ci.notify.events import command_environment, short_id, signature, webhook_body

log = logging.getLogger(__name__)

# A command or receiver that has not answered by then is treated as failed.
DEFAULT_TIMEOUT = 30.0
# Command output kept for the log.
MAX_LOGGED_OUTPUT = 2000


class DeliveryError(Exception):
    """The receiver did not confirm: try again later."""


class CommandTarget:
    """Runs ``--notify-command`` (split like a shell would, never run by one)
    with the facts in the environment and the result header on stdin."""

    def __init__(self, argv: list[str], timeout: float):
        self.argv = argv
        self.timeout = timeout
        self.key = "command"
        self.label = f"command {argv[0]}"
        self._child = procgroup.Child()

    def deliver(self, event: dict) -> None:
        """Run the command once; its whole process group is killed at the
        timeout, as it may have started helpers of its own.  The header
        goes in and the output comes out through files, so the wait never
        reaps the command before ``abort`` has forgotten it."""
        with tempfile.TemporaryFile() as header, tempfile.TemporaryFile() as out:
            header.write(event["header"].encode("utf-8"))
            header.seek(0)
            try:
                proc = self._child.start(self.argv, stdin=header, stdout=out,
                                         stderr=subprocess.STDOUT,
                                         env=command_environment(event, os.environ))
            except OSError as exc:
                raise DeliveryError(f"cannot start: {exc}") from None
            if not self._child.finish(proc, self.timeout, end_group=False):
                raise DeliveryError(f"timed out after {self.timeout:g}s")
            text = _tail(out).decode("utf-8", "replace").strip()[-MAX_LOGGED_OUTPUT:]
        if text:
            log.info("notify command output for %s: %s", short_id(event), text)
        if proc.returncode != 0:
            raise DeliveryError(f"exited {proc.returncode}")

    def abort(self) -> None:
        """Stopping: end a command in progress (it is retried next start)."""
        self._child.kill()


def _tail(handle) -> bytes:
    """The end of a command's output file: enough for the logged part
    even behind trailing blank lines."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - 16 * MAX_LOGGED_OUTPUT))
    return handle.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would turn the POST into a GET without the body: refuse it,
    so it counts as a failure the operator sees."""

    def redirect_request(self, *args, **kwargs):
        return None


class WebhookTarget:
    """POSTs the event as JSON; signed when a secret is given."""

    def __init__(self, url: str, secret: bytes | None, timeout: float):
        self.url = url
        self.secret = secret
        self.timeout = timeout
        # The URL often holds a token (chat incoming webhooks): logs and the
        # journal name it by host and a digest only.
        self.key = "webhook:" + hashlib.sha256(url.encode()).hexdigest()[:16]
        self.label = f"webhook {urllib.parse.urlsplit(url).hostname} ({self.key[8:16]})"
        self._opener = urllib.request.build_opener(_NoRedirect)

    def deliver(self, event: dict) -> None:
        """POST once; only a 2xx answer counts (no redirect is followed)."""
        body = webhook_body(event)
        headers = {"Content-Type": "application/json", "User-Agent": "ci-dispatcher-notify/1",
                   "X-CI-Event": event["event"], "X-CI-Event-Id": event["id"]}
        if self.secret:
            headers["X-CI-Signature-256"] = signature(self.secret, body)
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read(64 * 1024)
                status = response.status
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DeliveryError(str(getattr(exc, "reason", exc))) from None
        except Exception as exc:  # http.client's protocol errors
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
        if not 200 <= status < 300:
            raise DeliveryError(f"HTTP {status}")

    def abort(self) -> None:
        """Nothing to end: a request in progress ends at its timeout."""
