"""Exact collectives among peer processes over QUIC on 127.0.0.1."""


def test_all_collectives_exact_across_dtypes(master, spawn):
    n = 3
    peers = [spawn("collectives.py", master.addr, n) for _ in range(n)]
    done = [p.expect("done") for p in peers]
    for d in done:
        assert d["failures"] == [], f"rank {d['rank']}: {d['failures']}"
    assert len({d["digest"] for d in done}) == 1, "peers ended with different bytes"
    assert sorted(d["rank"] for d in done) == list(range(n))
    for p in peers:
        assert p.wait() == 0, p.diagnostics()
