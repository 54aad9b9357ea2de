"""Matrix cells on the dashboard (a real dashboard.py, a stand-in
dispatcher): a badge per cell in the overview, a section per cell on the
commit page, the cells in the JSON API, a waiting cell's reason from the
state, runner labels; the branch badge stays the commit's verdict."""

from __future__ import annotations

from support.dashboard import StandInDispatcher, commit_id, write_matrix_result, write_result


def test_a_matrix_commit_shows_its_cells_everywhere(results, dashboards, threaded_servers):
    stand_in = threaded_servers(StandInDispatcher)
    base = commit_id(1)
    write_result(results, base, "passed")
    head = commit_id(2)
    cells = write_matrix_result(results, head, previous=base)
    waiting = commit_id(3)
    stand_in.state_reply = {
        "queue": [{"commit": waiting, "branch": "main", "position": 1, "cell": "py3.9",
                   "waiting": "waiting for a runner with python3.9"}],
        "running": [], "counts": {},
        "runners": [{"name": "big", "address": "127.0.0.1:9", "state": "idle",
                     "labels": ["gpu", "python3.12"], "exclusive": True}]}
    dash = dashboards(results, f"127.0.0.1:{stand_in.port}")

    overview = dash.get("/")[2].decode()
    for name, verdict in cells.items():
        assert f'<span class="cell v-{verdict}" title="{name}: {verdict}">{name}</span>' \
            in overview
    assert "waiting for a runner with python3.9" in overview
    assert "gpu python3.12 (exclusive)" in overview

    page = dash.get(f"/commit/{head}")[2].decode()
    assert page.count('class="cell-box') == 3 and 'id="cell-py3.9"' in page
    assert "tests.test_calc.TestCalc.test_match" in page and "runner-py3.12" in page
    assert "<dt>flaky</dt><dd>1</dd>" in page      # a cell's own counts

    data = dash.json(f"/api/commits/{head}")
    assert data["verdict"] == "failed"
    assert [(c["name"], c["verdict"]) for c in data["cells"]] == list(cells.items())
    assert data["cells"][0]["failing_tests"][0]["name"].startswith("test_match")
    listed = dash.json("/api/commits")["commits"]
    assert listed[0]["cells"][0] == {"name": "py3.9", "verdict": "failed"}
    assert "cells" not in listed[1]          # a commit without a matrix: as before
    assert b">failing<" in dash.get("/badge/main.svg")[2]

    queued = dash.get(f"/commit/{waiting}")[2].decode()
    assert 'id="cell-py3.9"' in queued and "waiting for a runner with python3.9" in queued
