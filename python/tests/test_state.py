"""A joiner receives the members' shared state: digests equal everywhere."""


def test_joiner_receives_shared_state(master, spawn):
    members = [spawn("state.py", master.addr, "member") for _ in range(2)]
    for m in members:
        m.expect("ready")  # the two members formed a group before the joiner comes
    joiner = spawn("state.py", master.addr, "joiner")
    synced = {p: p.expect("synced") for p in [*members, joiner]}

    digests = {s["digest"] for s in synced.values()}
    assert len(digests) == 1, synced
    j = synced[joiner]
    assert j["equal"] and j["revision"] == 7 and j["size"] == 3, j
    assert j["received"] == 3 and j["bytes_received"] == 1000 * 4 + 8 + 77, j
    for m in members:
        assert synced[m]["equal"] and synced[m]["received"] == 0, synced[m]
    for p in [*members, joiner]:
        assert p.expect("summed")["value"] == 3
        assert p.wait() == 0, p.diagnostics()
