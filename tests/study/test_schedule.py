"""study.schedule.balance: a group that would run alone while the other workers idle is halved,
on measured costs only, never against the checkpoints on disk; and the driver trains the pieces."""
import sqlite3

import pytest

import doubles.study  # noqa: F401  (registers the dataset "synthetic" and the tiny_* architectures)
from minaction.study import checkpoint, run_study
from minaction.study.schedule import arrange, balance, makespan


def group(name, n):
    return [{"run_id": f"{name}{i}", "config": {"cell": name}} for i in range(n)]


def sizes(groups):
    return [(g[0]["config"]["cell"], len(g)) for g in groups]


COST = {"cnn": 10.0, "mlp": 1.0, "tiny": 0.5}  # seconds per member


def cost(g):
    return COST[g[0]["config"]["cell"]] * len(g)


def test_a_dominating_group_is_halved_until_it_fits_an_even_share():
    groups = [group("cnn", 10), group("mlp", 10), group("tiny", 10)]
    # total 115 s, 2 workers: share 57.5 -> cnn 100 -> 50 + 50
    out = balance(groups, 2, cost)
    assert sizes(out) == [("cnn", 5), ("cnn", 5), ("mlp", 10), ("tiny", 10)]
    assert [r["run_id"] for g in out for r in g] == [r["run_id"] for g in groups for r in g]  # order kept
    # 4 workers: share 28.75 -> cnn quarters of 3/2 members (30 s and 20 s: 30 > 28.75 halves once more)
    out4 = balance(groups, 4, cost)
    assert sum(n for c, n in sizes(out4) if c == "cnn") == 10
    assert all(COST[c] * n <= 28.75 or n == 1 for c, n in sizes(out4))
    assert ("mlp", 10) in sizes(out4) and ("tiny", 10) in sizes(out4)


def test_nothing_changes_without_costs_or_with_one_worker():
    groups = [group("cnn", 10), group("mlp", 10)]
    assert balance(groups, 2, lambda g: None if g[0]["config"]["cell"] == "mlp" else 1.0) == groups
    assert balance(groups, 1, cost) == groups
    assert balance([], 2, cost) == []


def test_a_lone_group_is_spread_over_the_workers():
    out = balance([group("mlp", 4)], 2, cost)
    assert sizes(out) == [("mlp", 2), ("mlp", 2)]
    assert sizes(balance([group("mlp", 1)], 2, cost)) == [("mlp", 1)]


def test_halving_goes_on_while_it_shortens_the_busiest_worker():
    """The diagonal race on 2 workers: a 10-member cnn group (11.7 s) beside 5.6 / 1.8 / 1.3 s groups.
    Even halves of the cnn leave 5.8 + 5.6 s on one worker; halving on to quarters gets near the
    10.2 s even share, and no piece is split where that would not shorten the busiest worker."""
    per = {"cnn": 1.17, "nm": 0.56, "sst": 0.18, "ecg": 0.13}

    def c(g):
        return per[g[0]["config"]["cell"]] * len(g)

    groups = [group("cnn", 10), group("sst", 10), group("nm", 10), group("ecg", 10)]
    out = balance(groups, 2, c)
    total = sum(c(g) for g in groups)
    assert sum(len(g) for g in out) == 40
    assert [r["run_id"] for g in out for r in g] == [r["run_id"] for g in groups for r in g]  # order kept
    assert makespan([c(g) for g in out], 2) <= 1.03 * total / 2 < makespan([5.85, 5.85, 5.6, 1.8, 1.3], 2)
    assert {n for cell, n in sizes(out) if cell != "cnn"} == {10}  # the small groups stay whole
    # nothing to gain: two equal groups on two workers are left alone
    assert sizes(balance([group("mlp", 10), group("mlp", 10)], 2, cost)) == [("mlp", 10), ("mlp", 10)]


def test_arrange_submits_the_costliest_piece_first_and_makespan():
    groups = [group("tiny", 2), group("cnn", 1), group("mlp", 3), group("tiny", 4)]
    assert sizes(arrange(groups, 1, cost)) == [("cnn", 1), ("mlp", 3), ("tiny", 4), ("tiny", 2)]
    assert arrange(groups, 2, lambda g: None) == groups  # unknown costs: the given order
    # the costs are measured for whole groups only (a piece of another size is None in the table):
    # pieces are ordered by their members' share
    whole = {("cnn", 10): 100.0, ("mlp", 10): 10.0, ("tiny", 10): 5.0}

    def table(g):
        return whole.get((g[0]["config"]["cell"], len(g)))

    out = arrange([group("tiny", 10), group("mlp", 10), group("cnn", 10)], 2, table)
    assert sizes(out) == [("cnn", 5), ("cnn", 5), ("mlp", 10), ("tiny", 10)]
    assert makespan([5, 4, 3, 3, 3], 2) == 10 and makespan([3, 3, 2, 2, 2], 2) == 7 and makespan([5, 4, 3], 1) == 12 and makespan([], 3) == 0


def test_checkpoints_decide_before_costs(tmp_path):
    cnn = group("cnn", 10)
    # a checkpoint of the whole group: it is not split, whatever the costs say
    checkpoint.path_for(tmp_path, cnn).write_bytes(b"x")
    assert sizes(balance([cnn, group("mlp", 10)], 2, cost, tmp_path)) == [("cnn", 10), ("mlp", 10)]
    checkpoint.path_for(tmp_path, cnn).unlink()
    # a killed run had split it into halves and one half into quarters: the same pieces again,
    # even with no costs known (so the checkpoints are found on resume)
    a, b = cnn[:5], cnn[5:]
    checkpoint.path_for(tmp_path, b).write_bytes(b"x")
    checkpoint.path_for(tmp_path, a[:3]).write_bytes(b"x")
    out = balance([cnn], 2, lambda g: None, tmp_path)
    assert [[r["run_id"] for r in g] for g in out] == [[r["run_id"] for r in a[:3]], [r["run_id"] for r in a[3:]],
                                                        [r["run_id"] for r in b]]


def synth():
    return {"name": "synth", "archs": ["tiny_mlp"], "datasets": ["synthetic"], "lams": [0.0, 1e-3],
            "seeds": [0, 1, 2], "group_by": "seed", "max_group": 10,
            "budget": {"epochs": 2, "batch_size": 32, "width": 16, "eval_batch_size": 64}}


def test_the_driver_trains_the_pieces_with_the_same_results(tmp_path):
    ref, split = tmp_path / "ref.sqlite", tmp_path / "split.sqlite"
    s0 = run_study(synth(), ref, workers=2, progress=False)

    def costs():  # the lam = 0 cell costs 10x the other: 30 of 33 s, more than the 16.5 s share of a worker
        return lambda g: (10.0 if g[0]["config"]["lam"] == 0 else 1.0) * len(g)

    s1 = run_study(synth(), split, workers=2, progress=False, balance=costs)
    assert s0["done"] == s1["done"] == 6
    assert s0["groups"] == 2 and s1["groups"] == 4  # lam 0: 3 -> 2 + 1 -> 1 + 1 + 1
    sizes_by_lam = {}
    for lam, gs in sqlite3.connect(split).execute("SELECT lam, group_size FROM runs"):
        sizes_by_lam.setdefault(lam, set()).add(gs)
    assert sizes_by_lam == {0.0: {1}, 1e-3: {3}}
    cols = "run_id, status, epochs, test_acc, test_loss, test_energy"
    a = {r[0]: r[1:] for r in sqlite3.connect(ref).execute(f"SELECT {cols} FROM runs")}
    b = {r[0]: r[1:] for r in sqlite3.connect(split).execute(f"SELECT {cols} FROM runs")}
    assert a.keys() == b.keys()
    for k in a:  # a run's results do not depend on the group it trained in
        assert a[k][:2] == b[k][:2]
        assert b[k][2:] == pytest.approx(a[k][2:], rel=1e-6, abs=1e-7)
