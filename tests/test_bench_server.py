"""The load test behind `gemmakit bench --server`: a real `gemmakit serve` subprocess on a free loopback port."""

from __future__ import annotations

import json

import pytest

from gemmakit import GemmaError
from gemmakit.bench.server import markdown, run_load_test


@pytest.mark.parametrize("client", ["http", "openai"])
def test_load_test_reports_every_round(client):
    out = run_load_test(None, clients=(1, 3), max_tokens=4, ctx_size=128, repeats=2, client=client)
    json.dumps(out)  # JSON-able
    assert out["client"] == client
    assert out["max_batch"] == 3 and [r["clients"] for r in out["rounds"]] == [1, 3]
    for r in out["rounds"]:
        assert r["requests"] == r["clients"] and r["completion_tokens"] == 4 * r["clients"]
        assert r["aggregate_tok_s"] > 0 and 0 < r["ttft_s_mean"] <= r["ttft_s_max"] <= r["wall_s"]
        assert len(r["aggregate_runs"]) == 2 and r["aggregate_tok_s"] == min(r["aggregate_runs"])
        # the same work through Model.generate after each server round, the server's yardstick
        assert len(r["generate_runs"]) == 2 and r["generate_tok_s"] > 0 and r["vs_generate"] > 0
    assert "serve vs generate" in markdown(out)


def test_load_test_refuses_bad_arguments():
    with pytest.raises(GemmaError):
        run_load_test(None, clients=(), max_tokens=4)
    with pytest.raises(GemmaError, match="unknown load test client"):
        run_load_test(None, clients=(1,), max_tokens=4, client="curl")
    with pytest.raises(GemmaError, match="exited"):
        run_load_test("/nonexistent/model.gguf", clients=(1,), max_tokens=4, startup_timeout=60)


def test_mixed_workload_serves_the_same_queue_every_round(monkeypatch):
    """--mixed: every round serves the whole queue of mixed requests, its clients each taking the next one; no
    generate yardstick. Shrunk here: 5 requests of 4 or 30 words and 2 or 3 tokens."""
    from gemmakit.bench import server

    monkeypatch.setattr(server, "MIXED_WORDS", (4, 30))
    monkeypatch.setattr(server, "MIXED_TOKENS", (2, 3))
    monkeypatch.setattr(server, "MIXED_REQUESTS", 5)
    jobs = server.mixed_jobs()
    assert jobs == server.mixed_jobs() and {len(p.split()) for p, _ in jobs} == {4, 30}
    out = run_load_test(None, clients=(1, 2), ctx_size=128, repeats=1, workload="mixed")
    assert out["workload"] == "mixed"
    for r in out["rounds"]:
        assert r["requests"] == 5 and r["completion_tokens"] == sum(n for _, n in jobs)
        assert "generate_tok_s" not in r
    assert "the mixed workload" in markdown(out)
    with pytest.raises(GemmaError, match="unknown load test workload"):
        run_load_test(None, clients=(1,), workload="chat")
