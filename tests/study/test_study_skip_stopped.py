"""A group whose members stop at different times costs what its members still training cost:
a model that can skip members (the cnn's loop of members on a CPU) stops running a member
once it has early-stopped, and every recorded result stays what it was when the stopped
member kept being computed (its term masked out of the loss)."""
import pytest
import torch

import doubles.study  # noqa: F401  (registers the dataset "synthetic")
from minaction import models
from minaction.models.cnn import LoopEnsemble
from minaction.study import presets, trainer


@pytest.fixture(autouse=True)
def _cost_table(tmp_path, monkeypatch):
    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path / "cache"))


def cnn_spec(**budget):
    b = {"name": "test", "epochs": 6, "batch_size": 16, "width": 8, "eval_batch_size": 64, "eval_every": 2,
         "dtype": "float64", "lr": 0.05, "patience_epochs": 1.0, "train_subset": 0}
    b.update(budget)
    return presets.load_preset({"name": "skip-test", "archs": ["cnn"], "datasets": ["synthetic_vision"],
                                "lams": [0.0, 1e-3], "seeds": [0, 1, 2], "group_by": "seed+lam", "max_group": 10,
                                "budget": b, "data_opts": {"synthetic_vision": {"n": 96}}})


def count_member_forwards(monkeypatch):
    calls = []
    real_forward = LoopEnsemble.forward

    def spy(self, x):
        calls.append(list(self.active_members))
        return real_forward(self, x)

    monkeypatch.setattr(LoopEnsemble, "forward", spy)
    return calls


def strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]


def test_stopped_members_are_skipped_and_results_unchanged(monkeypatch):
    runs = presets.expand(cnn_spec())
    assert len(runs) == 6
    calls = count_member_forwards(monkeypatch)
    skipped = trainer.train_group(runs)
    ran_skipping = [list(c) for c in calls]
    calls.clear()
    monkeypatch.setattr(trainer, "_set_active", lambda model, active: None)  # the old way: every member runs
    full = trainer.train_group(runs)
    assert all(all(c) for c in calls)
    # the members stopped at different times, and the skipping run left the stopped ones out
    epochs = [r["run"]["epochs"] for r in full]
    assert len(set(epochs)) > 1, f"every member stopped at the same epoch ({epochs}): the test would see nothing"
    assert any(not all(c) for c in ran_skipping)
    member_forwards = sum(sum(c) for c in ran_skipping)
    assert member_forwards < sum(len(c) for c in calls)
    # every recorded result is the same, float64 bit for bit
    for a, b in zip(skipped, full):
        assert a["run"]["status"] == b["run"]["status"] == "done"
        for k in ("epochs", "val_acc", "test_acc", "test_loss", "test_energy", "train_loss"):
            assert a["run"][k] == b["run"][k], k
        assert strip(a["evals"]) == strip(b["evals"])
        assert strip(a["epochs"]) == strip(b["epochs"])


def test_loop_ensemble_skips_members():
    meta = _meta()
    m = LoopEnsemble([models.build("cnn", meta, width=8, seeds=[g]) for g in range(3)]).double()
    x = torch.randn(4, *meta.input_shape, dtype=torch.float64)
    full = m(x)
    e_full = _total(m)
    m.set_active_members(torch.tensor([True, False, True]))
    assert m.active_members == [True, False, True]
    part = m(x)
    e_part = _total(m)
    assert torch.equal(part[0], full[0]) and torch.equal(part[2], full[2])
    assert torch.equal(part[1], torch.zeros_like(part[1]))  # not connected to member 1: see the grads below
    assert torch.equal(e_part[[0, 2]], e_full[[0, 2]]) and e_part[1] == 0
    (part.sum() + e_part.sum()).backward()
    assert all(p.grad is None for p in m.members[1].parameters())
    assert all(p.grad is not None for p in m.members[0].parameters())
    # per-member input [G, B, ...] too
    xs = torch.randn(3, 4, *meta.input_shape, dtype=torch.float64)
    assert torch.equal(m(xs)[2], m.members[2](xs[2]))
    m.set_active_members(None)
    assert m.active_members == [True] * 3 and torch.equal(m(x), full)
    m.set_active_members([True, True, True])
    assert m.active_members == [True] * 3
    with pytest.raises(ValueError, match="at least one member"):
        m.set_active_members([False] * 3)
    with pytest.raises(ValueError, match="3 flags"):
        m.set_active_members([True])


def _meta():
    from minaction.data import load

    return load("synthetic_vision", "train", n=32).meta


def _total(m):
    from minaction import total_energy

    return total_energy(m)
