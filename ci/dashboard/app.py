"""The dashboard's application: what each URL answers, pure of HTTP.

``dashboard.py`` owns the socket, the request handler and its security
headers, and hands each authorised GET here as (path, query, nonce); the
answer is a ``Response`` it sends as is.  Kept apart from HTTP so that the
pages and the API can be read, and tested, without a server.
"""

from __future__ import annotations

import json
import re
import urllib.parse

from ci.dashboard import index as dashboard_index
from ci.dashboard import assets, cells, history_pages, pages, pruned, queue_pages
from ci.dashboard.landqueue import QueueSource
from ci.history.queries import DEFAULT_RUNS, MAX_RUNS, HistoryReader, Unavailable
from ci.dashboard.live import LiveState, without_finished
from ci.history.store import test_key as store_key
from ci.results import CELL_NAME_RE, VERDICTS
from ci.wire import valid_full_commit

MAX_HTML_OUTPUT = 1024 * 1024
# A cell's section shows the tail of its output (the whole: its own file).
MAX_CELL_OUTPUT = 64 * 1024
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
BRANCH_RE = pages.BRANCH_RE
COMMIT_PATH = r"([0-9a-f]{40}|[0-9a-f]{64})"


class Response:
    def __init__(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8",
                 headers: dict | None = None):
        self.status, self.body, self.ctype = status, body, ctype
        self.headers = headers or {}


def json_response(data, status: int = 200) -> Response:
    return Response(status, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"),
                    "application/json")


class BadRequest(Exception):
    """A query value that cannot be used (answered 400)."""


class Dashboard:
    """The read-only application: routes to pages and API answers."""

    ROUTES = [
        (re.compile(r"/"), "overview"),
        (re.compile(r"/api/status"), "api_status"),
        (re.compile(r"/api/commits"), "api_commits"),
        (re.compile(r"/api/commits/" + COMMIT_PATH), "api_commit"),
        (re.compile(r"/api/page/overview"), "fragments_overview"),
        (re.compile(r"/api/page/commit/" + COMMIT_PATH), "fragments_commit"),
        (re.compile(r"/commit/" + COMMIT_PATH), "commit_page"),
        (re.compile(r"/commit/" + COMMIT_PATH + r"/output\.txt"), "output_text"),
        (re.compile(r"/badge/([^/]{1,600})\.svg"), "badge"),
        (re.compile(r"/favicon\.svg"), "favicon"),
        (re.compile(r"/tests"), "tests_page"),
        (re.compile(r"/api/tests"), "api_tests"),
        (re.compile(r"/api/page/tests"), "fragments_tests"),
        (re.compile(r"/test"), "test_page"),
        (re.compile(r"/api/test"), "api_test"),
        (re.compile(r"/api/page/test"), "fragments_test"),
        (re.compile(r"/queue"), "queue_page"),
        (re.compile(r"/api/queue"), "api_queue"),
        (re.compile(r"/api/page/queue"), "fragments_queue"),
    ]

    def __init__(self, index: dashboard_index.ResultIndex, live: LiveState,
                 history: HistoryReader | None = None, queue: QueueSource | None = None):
        self.index = index
        self.live = live
        self.history = history
        # The land queue, from the dispatcher (None: not asked, as in tests
        # of the other pages).
        self.queue = queue

    def answer(self, path: str, query: dict[str, str], nonce: str) -> Response:
        # An API client gets its refusals as JSON too, not as an HTML page.
        api = path.startswith("/api/")
        for pattern, name in self.ROUTES:
            match = pattern.fullmatch(path)
            if match:
                try:
                    return getattr(self, name)(query, nonce, *match.groups())
                except BadRequest as exc:
                    if api:
                        return json_response({"error": str(exc)}, 400)
                    return Response(400, pages.message_page("Bad request", nonce, str(exc)))
        return json_response({"error": "not found"}, 404) if api else self.not_found(nonce)

    def not_found(self, nonce: str, what: str = "There is no such page.") -> Response:
        return Response(404, pages.message_page("Not found", nonce, what))

    # ---- query values

    @staticmethod
    def _filters(query: dict) -> dict:
        branch = query.get("branch") or None
        if branch is not None and not BRANCH_RE.fullmatch(branch):
            raise BadRequest("branch: letters, digits and . _ / - + @ only")
        verdict = query.get("verdict") or None
        if verdict is not None and verdict not in VERDICTS:
            raise BadRequest(f"verdict: one of {', '.join(VERDICTS)}")
        before = query.get("before") or None
        if before is not None and not valid_full_commit(before):
            raise BadRequest("before: a full commit id")
        try:
            limit = int(query.get("limit") or DEFAULT_LIMIT)
        except ValueError:
            raise BadRequest("limit: a number") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit: 1 to {MAX_LIMIT}")
        return {"branch": branch, "verdict": verdict, "before": before, "limit": limit}

    def _commits(self, filters: dict) -> tuple[list[dict], str | None]:
        try:
            return self.index.query(**filters)
        except dashboard_index.UnknownCursor:
            raise BadRequest("before: no result for that commit; start from the newest "
                             "results") from None

    # ---- overview

    def _live_state(self) -> tuple[dict | None, str | None]:
        """The dispatcher's state without the commits whose result the
        index holds; the index is refreshed first, so that every part of
        one answer reads the same results."""
        self.index.refresh()
        state, error = self.live.state()
        return without_finished(state, self.index.finished_of), error

    @staticmethod
    def _page_params(filters: dict) -> dict:
        """What a link to the same listing keeps (all but the cursor), so
        that paging links and live updates ask for the page as it was."""
        params = {k: filters[k] for k in ("branch", "verdict") if filters[k]}
        if filters["limit"] != DEFAULT_LIMIT:
            params["limit"] = filters["limit"]
        return params

    def _overview_sections(self, filters: dict) -> dict:
        state, error = self._live_state()
        branches = self.index.branches()
        running = (state or {}).get("running", [])
        running_branches = {j["branch"] for j in running}
        # A running commit whose tests already fail: its branch is failing now.
        failing_now = {j["branch"]: j["failing"] for j in running if j.get("failing")}
        for item in branches:
            item["running"] = item["branch"] in running_branches
            item["failing_now"] = failing_now.get(item["branch"])
        commits, cursor = self._commits(filters)
        for item in commits:
            item["badges"] = cells.badges(dashboard_index.parse_cells(item.get("cells")))
        title = "Results"
        if filters["branch"] or filters["verdict"]:
            title = "Results: " + " ".join(v for v in (filters["branch"], filters["verdict"]) if v)
        sections = {
            "sec-banner": pages.banner_section(error),
            "sec-branches": pages.branches_section(branches),
            "sec-active": pages.active_section(state),
            "sec-commits": pages.commits_section(commits, cursor, self._page_params(filters),
                                                 bool(filters["before"]), title),
            "sec-runners": pages.runners_section(state),
        }
        return sections

    def overview(self, query, nonce) -> Response:
        filters = self._filters(query)
        sections = self._overview_sections(filters)
        endpoint = ""
        if not filters["before"]:
            params = self._page_params(filters)
            endpoint = "/api/page/overview" + ("?" + urllib.parse.urlencode(params)
                                              if params else "")
        return Response(200, pages.page("CI dashboard", nonce, sections, endpoint,
                                        css=cells.CSS))

    def fragments_overview(self, query, nonce) -> Response:
        sections = self._overview_sections(self._filters(query))
        return json_response({"sections": sections, "final": False})

    # ---- one commit

    def _commit_view(self, commit: str):
        """(status, sections, final) or None when nothing is known."""
        item = self.index.get(commit)
        if item is not None:
            output = self.index.read_output(commit, MAX_HTML_OUTPUT) or ("", False)
            sections = {
                "sec-summary": pages.fields_section(item, "finished " + pages.when(
                    item["finished"]) + " UTC"),
                "sec-cells": cells.cells_section(self._finished_cells(commit, item)),
                "sec-tests": pages.tests_section(self._failing_tests(commit)),
                "sec-output": pages.output_section(output[0], output[1], commit),
            }
            return "finished", sections, True
        # The cached state if fresh, else asked for (a commit's page may be
        # the first page anyone opened).
        state = self.live.state()[0] or {}
        job = self._running_job(state, commit)
        status, tail = self.live.log(commit) if job is not None else ("idle", "")
        if status == "running":
            item = {"commit": commit, "verdict": "running", "branch": job.get("branch"),
                    "runner": job.get("runner")}
            elapsed = job.get("elapsed")
            return "running", {
                "sec-summary": pages.fields_section(item, "running" if elapsed is None else
                                                    f"running, {pages.seconds(elapsed)} elapsed"),
                "sec-cells": cells.cells_section(cells.live_cells(state, commit)),
                "sec-tests": pages.Safe(""),
                "sec-output": pages.output_section(tail, False, commit, live=True)}, False
        job = next((j for j in state.get("queue", []) if j["commit"] == commit), None)
        if job is not None:
            item = {"commit": commit, "verdict": "queued", "branch": job.get("branch")}
            return "queued", {
                "sec-summary": pages.fields_section(item, f"queued, position {job['position']}"),
                "sec-cells": cells.cells_section(cells.live_cells(state, commit)),
                "sec-tests": pages.Safe(""), "sec-output": pages.Safe("")}, False
        # Pruned (and not being tested again): tested, its files gone.
        tombstone = self.index.pruned.get(commit)
        if tombstone is not None:
            return "pruned", pruned.page_sections(tombstone), True
        return None

    def _finished_cells(self, commit: str, item: dict) -> list[dict]:
        """Each cell of a finished commit: its verdict from the commit's
        ``cells:`` field, its own header, failing tests and output tail
        from its file (absent: only the verdict is shown)."""
        found = []
        for name, verdict in dashboard_index.parse_cells(item.get("cells")):
            output = self.index.read_output(commit, MAX_CELL_OUTPUT, cell=name)
            found.append({"name": name, "verdict": verdict,
                          "fields": self.index.read_cell(commit, name) or {},
                          "failing_tests": self.index.test_report(commit, cell=name),
                          "output": output[0] if output else ""})
        self._date_quarantines(commit, [t for c in found for t in c["failing_tests"]])
        return found

    def _failing_tests(self, commit: str) -> list[dict]:
        """The commit's failing tests; those named by their JUnit id link
        to their history page, and failing quarantined ones say since
        which commit they are quarantined."""
        tests = self.index.test_report(commit, with_source=True)
        for test in tests:
            if test.pop("source") == "junit":
                test["url"] = history_pages.test_url(test["name"], store_key(test["name"]))
        self._date_quarantines(commit, tests)
        return tests

    def _date_quarantines(self, commit: str, tests: list[dict]) -> None:
        """Set ``quarantined_since`` (a commit id) on each failing
        quarantined test the history dates: the first commit of the
        branch's current quarantine of it.  Without a history, nothing."""
        names = [t["name"] for t in tests if t["kind"] == "quarantined"]
        if not names or self.history is None:
            return
        try:
            since = self.history.quarantined_since(commit, names)
        except Unavailable:
            return
        for test in tests:
            if test["kind"] == "quarantined" and test["name"] in since:
                test["quarantined_since"] = since[test["name"]]

    @staticmethod
    def _running_job(state: dict, commit: str) -> dict | None:
        """The commit's row in the live state's ``running``, or None.  Its
        output is asked for only then: a ``log:`` call per page poll of a
        queued or unknown commit would be a dispatcher call each, made
        one at a time and not spared by the state's failure backoff."""
        return next((j for j in state.get("running", []) if j["commit"] == commit), None)

    def commit_page(self, query, nonce, commit) -> Response:
        view = self._commit_view(commit)
        if view is None:
            return self.not_found(nonce, "No result for this commit, and it is not running.")
        status, sections, final = view
        endpoint = "" if final else f"/api/page/commit/{commit}"
        return Response(200, pages.page(f"{commit[:pages.SHORT]} · {status}", nonce, sections,
                                        endpoint, css=cells.CSS))

    def fragments_commit(self, query, nonce, commit) -> Response:
        view = self._commit_view(commit)
        if view is None:
            return json_response({"error": "unknown commit"}, 404)
        status, sections, final = view
        return json_response({"sections": sections, "final": final, "status": status,
                              "title": f"{commit[:pages.SHORT]} · {status}"})

    def output_text(self, query, nonce, commit) -> Response:
        output = self.index.read_output(commit) if self.index.get(commit) else None
        if output is None:
            return self.not_found(nonce)
        return Response(200, output[0].encode("utf-8"), "text/plain; charset=utf-8")

    # ---- JSON API

    @staticmethod
    def _api_item(item: dict) -> dict:
        item = dict(item)
        item.pop("badges", None)
        item["finished"] = pages.when(item.get("finished")).replace(" ", "T") + "Z"
        item["url"] = f"/commit/{item['commit']}"
        if item.get("cells") is not None:
            item["cells"] = [{"name": name, "verdict": verdict} for name, verdict
                             in dashboard_index.parse_cells(item["cells"])]
        return item

    def api_status(self, query, nonce) -> Response:
        state, error = self._live_state()
        state = state or {}
        return json_response({
            "dispatcher": {"reachable": error is None, "error": error},
            "queue": state.get("queue", []), "running": state.get("running", []),
            "runners": state.get("runners", []), "counts": state.get("counts", {}),
            "branches": self.index.branches(), "results": self.index.count(),
            "pruned": self.index.pruned_count()})

    def api_commits(self, query, nonce) -> Response:
        commits, cursor = self._commits(self._filters(query))
        return json_response({"commits": [self._api_item(c) for c in commits], "next": cursor})

    def api_commit(self, query, nonce, commit) -> Response:
        item = self.index.get(commit)
        if item is None:
            state = self.live.state()[0] or {}
            running = self._running_job(state, commit) is not None
            status, tail = self.live.log(commit) if running else ("idle", "")
            tombstone = self.index.pruned.get(commit)
            if status != "running" and tombstone is not None:
                return json_response(pruned.api_item(tombstone))
            if status != "running":
                return json_response({"error": "no result for this commit"}, 404)
            return json_response({"commit": commit, "status": "running", "live_output": tail,
                                  "cells": cells.live_cells(state, commit)})
        output = self.index.read_output(commit, MAX_HTML_OUTPUT) or ("", False)
        data = self._api_item(item)
        data.update(status="finished", failing_tests=self._failing_tests(commit),
                    output=output[0], output_truncated=output[1])
        if item.get("cells") is not None:
            data["cells"] = [{**c["fields"], "name": c["name"], "verdict": c["verdict"],
                              "failing_tests": c["failing_tests"]}
                             for c in self._finished_cells(commit, item)]
        for test in data["failing_tests"] + [t for c in data.get("cells") or []
                                             for t in c["failing_tests"]]:
            if test.get("quarantined_since"):
                test["quarantined_since_url"] = f"/commit/{test['quarantined_since']}"
        return json_response(data)

    def favicon(self, query, nonce) -> Response:
        return Response(200, assets.FAVICON, "image/svg+xml")

    def badge(self, query, nonce, quoted) -> Response:
        branch = urllib.parse.unquote(quoted)
        if not BRANCH_RE.fullmatch(branch):
            return self.not_found(nonce)
        states = {b["branch"]: b["state"] for b in self.index.branches()}
        return Response(200, pages.badge_svg(branch, states.get(branch, "unknown")),
                        "image/svg+xml")

    # ---- the land queue (the observer's snapshot, kept by the dispatcher)

    def _queue(self) -> tuple[dict | None, str | None]:
        if self.queue is None:
            return None, "this dashboard does not ask the dispatcher for the land queue"
        return self.queue.get()

    def queue_page(self, query, nonce) -> Response:
        return Response(200, pages.page("Land queue", nonce,
                                        queue_pages.sections(*self._queue()),
                                        "/api/page/queue", queue_pages.CSS))

    def fragments_queue(self, query, nonce) -> Response:
        return json_response({"sections": queue_pages.sections(*self._queue()),
                              "final": False})

    def api_queue(self, query, nonce) -> Response:
        snapshot, error = self._queue()
        return json_response(queue_pages.api_view(snapshot, error),
                             200 if snapshot is not None else 503)

    # ---- test history (ci/history: the dispatcher's store, read-only)

    def _history(self):
        if self.history is None:
            raise Unavailable("this dashboard has no test history (--history PATH)")
        return self.history

    def _tests_view(self) -> tuple[int, dict]:
        try:
            return 200, history_pages.tests_sections(self._history().overview())
        except Unavailable as exc:
            return 503, {"sec-tests-summary": history_pages.unavailable_section(str(exc))}

    def tests_page(self, query, nonce) -> Response:
        status, sections = self._tests_view()
        return Response(status, pages.page("Tests", nonce, sections,
                                           "/api/page/tests" if status == 200 else "",
                                           history_pages.CSS))

    def fragments_tests(self, query, nonce) -> Response:
        status, sections = self._tests_view()
        return json_response({"sections": sections, "final": status != 200}, status)

    def api_tests(self, query, nonce) -> Response:
        try:
            return json_response(self._urls(self._history().overview()))
        except Unavailable as exc:
            return json_response({"error": str(exc)}, 503)

    @staticmethod
    def _test_query(query: dict) -> dict:
        name, key = query.get("id"), query.get("key")
        if (name is None) == (key is None) or (name is not None and not name):
            raise BadRequest("give the test's id (id=...) or its key (key=...)")
        if key is not None and not re.fullmatch(r"[0-9a-f]{24}", key):
            raise BadRequest("key: 24 hex digits, as the test links carry")
        branch = query.get("branch")
        if branch and not BRANCH_RE.fullmatch(branch):
            raise BadRequest("branch: letters, digits and . _ / - + @ only")
        cell = query.get("cell") or None
        if cell is not None and not CELL_NAME_RE.fullmatch(cell):
            raise BadRequest("cell: a matrix cell's name (letters, digits and . _ -)")
        try:
            limit = int(query.get("limit") or DEFAULT_RUNS)
        except ValueError:
            raise BadRequest("limit: a number") from None
        if not 1 <= limit <= MAX_RUNS:
            raise BadRequest(f"limit: 1 to {MAX_RUNS}")
        return {"name": name, "key": key, "branch": branch, "limit": limit, "cell": cell}

    def _test_view(self, query: dict) -> tuple[int, dict | None, str]:
        """(status, test or None, the reason when there is none)."""
        try:
            test = self._history().test(**self._test_query(query))
        except Unavailable as exc:
            return 503, None, str(exc)
        if test is None:
            return 404, None, "The test history has no such test."
        return 200, test, ""

    def test_page(self, query, nonce) -> Response:
        status, test, reason = self._test_view(query)
        if test is None:
            return Response(status, pages.page("Test history", nonce, {
                "sec-test-head": history_pages.unavailable_section(reason)}, "",
                history_pages.CSS))
        endpoint = "/api/page/test?" + urllib.parse.urlencode(query)
        return Response(200, pages.page(test["id"][:80] + " · history", nonce,
                                        history_pages.test_sections(test), endpoint,
                                        history_pages.CSS))

    def fragments_test(self, query, nonce) -> Response:
        status, test, reason = self._test_view(query)
        if test is None:
            return json_response({"error": reason}, status)
        return json_response({"sections": history_pages.test_sections(test), "final": False})

    def api_test(self, query, nonce) -> Response:
        status, test, reason = self._test_view(query)
        if test is None:
            return json_response({"error": reason}, status)
        for run in test["recent"]:
            run["finished"] = pages.when(run["finished"]).replace(" ", "T") + "Z"
            run["url"] = f"/commit/{run['commit']}"
        return json_response(self._urls(test))

    @staticmethod
    def _urls(data: dict) -> dict:
        return history_pages.api_links(data)
