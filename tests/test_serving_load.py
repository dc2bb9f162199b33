"""A short run of bench/serve_load.py (50 clients x 5 s on 127.0.0.1, abuse mixed in): every request answered with
the status its kind calls for (200 / 400 / 408 / 413 / 429), none a 5xx or a broken connection, the server's memory
bounded and /health healthy afterwards.  The full run (200 clients x 30 s): docs/serving.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import serve_load  # noqa: E402

pytest.importorskip("uvicorn")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="server RSS is read from /proc (Linux)")
def test_load_with_abuse_mixed_in_is_answered_with_bounded_memory():
    r = serve_load.main(["clients=50", "duration=5"])
    assert r["answered"] > 100, r["answered"]
    assert r["unanswered"] == 0 and r["status_5xx"] == 0, r["status_counts"]
    assert r["unexpected"] == {}, r["unexpected"]  # each kind got its own answer, 408 or 429
    statuses = {int(s) for s in r["status_counts"]}
    assert statuses <= {200, 400, 408, 413, 429} and 200 in statuses
    for kind, status in [
        ("generate", "200"),
        ("png_bomb", "400"),
        ("jpeg_bomb", "400"),
        ("big_json", "413"),
        ("chunked", "413"),
        ("big_upload", "413"),
        ("slow_stall", "408"),
    ]:
        assert r["by_kind"][kind]["statuses"].get(status, 0) > 0, (kind, r["by_kind"][kind])
    assert r["server_rss_mb"]["growth"] < 200, r["server_rss_mb"]  # bombs and big bodies never entered memory
    h = r["health_after"]
    assert h["code"] == 200 and h["status"] == "ok" and h["queued"] == 0 and h["recent_failures"] == 0, h
    assert r["server_log"]["tracebacks"] == 0, r["server_log"]["tail"]
    assert r["shutdown"]["returncode"] in (0, -15) and r["shutdown"]["seconds"] < 15, r["shutdown"]
