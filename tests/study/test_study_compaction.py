"""A batched group sheds its stopped members: once members early-stop (or diverge), the
trainer rebuilds the model with only the members still training and carries their weights
and optimizer state over, so the group costs what its remaining members cost. Every
recorded result equals the run that keeps computing the stopped members, and a checkpoint
of a shrunken group resumes into a model of the same members."""
import pytest
import torch

import doubles.study  # noqa: F401  (registers the dataset "synthetic" and the tiny_* architectures)
from minaction import models
from minaction.study import checkpoint, presets, trainer


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "after_save", None)
    monkeypatch.setenv("MINACTION_CHECKPOINT_EPOCH_S", "0")  # these tests kill at epoch-end saves: save at each


def spec(**budget):
    b = {"name": "test", "epochs": 8, "batch_size": 16, "width": 16, "eval_batch_size": 64, "eval_every": 2,
         "dtype": "float64", "patience_epochs": 1, "lr": 0.05}
    b.update(budget)
    return presets.load_preset({"name": "compact-test", "archs": ["tiny_mlp"], "datasets": ["synthetic"],
                                "lams": [0.0, 1e-2], "seeds": [0, 1, 2], "group_by": "seed+lam", "max_group": 10,
                                "budget": b, "data_opts": {"synthetic": {"n": 64}}})


group, strip = doubles.study.one_group, doubles.study.without_timings


def spy_carry(monkeypatch):
    sizes = []
    real = trainer._carry_over

    def spy(old, old_opt, old_params, new, new_opt, new_params, pos):
        sizes.append(len(pos))
        return real(old, old_opt, old_params, new, new_opt, new_params, pos)

    monkeypatch.setattr(trainer, "_carry_over", spy)
    return sizes


@pytest.fixture(scope="module")
def uncompacted():
    """The group with every member computed to the end (the trainer before compaction)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(trainer, "_compactable", lambda model, G: False)
    try:
        return strip(trainer.train_group(group(spec())))
    finally:
        mp.undo()


def test_compaction_changes_no_result(monkeypatch, uncompacted):
    sizes = spy_carry(monkeypatch)
    out = strip(trainer.train_group(group(spec())))
    epochs = [run["epochs"] for run, _ in out]
    assert len(set(epochs)) > 1, f"the members stopped together ({epochs}): nothing to shed"
    assert sizes and sizes == sorted(sizes, reverse=True) and sizes[-1] < 6  # the model shrank, step by step
    assert 1 in sizes  # down to the last member alone (a one-member model)
    assert len(out) == len(uncompacted) == 6
    for (ra, rows_a), (rb, rows_b) in zip(out, uncompacted):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-12, abs=1e-12), k
            else:
                assert ra[k] == rb[k], k
        for ta, tb in zip(rows_a, rows_b):
            assert len(ta) == len(tb)
            for a, b in zip(ta, tb):
                assert a.keys() == b.keys()
                for k in a:
                    assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-12), k


def test_resume_of_a_shrunken_group(tmp_path, monkeypatch, uncompacted):
    runs = group(spec())
    saves = []

    class Killed(Exception):
        pass

    def hook(path, loop):
        saves.append(list(loop["live"]))
        if len(loop["live"]) < len(runs):
            raise Killed

    monkeypatch.setattr(checkpoint, "after_save", hook)
    with pytest.raises(Killed):
        trainer.train_group(runs, ckpt=checkpoint.GroupCheckpoint(tmp_path, runs, every_s=0))
    live = saves[-1]
    ck = checkpoint.GroupCheckpoint(tmp_path, runs, every_s=0)
    assert ck.peek_live() == live and len(live) < 6
    monkeypatch.setattr(checkpoint, "after_save", None)
    sizes = spy_carry(monkeypatch)
    out = trainer.train_group(runs, ckpt=ck)
    assert out[0]["resumed_from"] is not None
    assert all(n < len(live) for n in sizes)  # it went on from the shrunken model
    for (ra, _), (rb, _) in zip(strip(out), uncompacted):
        for k in ("epochs", "val_acc", "test_acc", "test_loss", "test_energy"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-12, abs=1e-12), k


def test_peek_live_of_a_whole_group_or_no_file(tmp_path):
    runs = group(spec())
    ck = checkpoint.GroupCheckpoint(tmp_path, runs)
    assert ck.peek_live() is None  # no file
    checkpoint.path_for(tmp_path, runs).parent.mkdir(parents=True, exist_ok=True)
    checkpoint.path_for(tmp_path, runs).write_bytes(b"not a checkpoint")
    assert ck.peek_live() is None  # load() will say what is wrong


def test_carry_over_takes_weights_and_adam_state():
    meta = doubles.study.load("synthetic", "train", n=32).meta
    seeds = [3, 4, 5]
    old = models.build("tiny_mlp", meta, width=8, num_models=3, seeds=seeds).double()
    ps = [p for p in old.parameters()]
    opt = torch.optim.Adam(ps, lr=0.01)
    x = torch.randn(3, 5, 1, 8, 8, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        old(x).square().sum().backward()
        opt.step()
    pos = torch.tensor([0, 2])
    new = models.build("tiny_mlp", meta, width=8, num_models=2, seeds=[seeds[0], seeds[2]]).double()
    nps = [p for p in new.parameters()]
    nopt = torch.optim.Adam(nps, lr=0.01)
    trainer._carry_over(old, opt, ps, new, nopt, nps, pos)
    for a, b in zip(ps, nps):
        assert torch.equal(a[pos], b)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][k][pos], nopt.state[b][k])
        assert torch.equal(opt.state[a]["step"], nopt.state[b]["step"])
    # one more step on each: the kept members move the same way
    opt.zero_grad()
    old(x).square().sum().backward()
    opt.step()
    nopt.zero_grad()
    new(x[pos]).square().sum().backward()
    nopt.step()
    for a, b in zip(ps, nps):
        assert torch.allclose(a[pos], b, rtol=1e-13, atol=1e-15)
    # a model whose tensors lack the member dimension is not compacted
    assert trainer._compactable(old, 3) and not trainer._compactable(old, 2)
    loop = models.build("cnn", doubles.study.load("synthetic_vision", "train", n=8).meta, width=8, num_models=2)
    assert not trainer._compactable(loop, 2)


def _meta_and_input(modality, G):
    from minaction.data.core import DataMeta

    if modality == "vision":
        return DataMeta("toy", "vision", 3, (1, 8, 8), torch.float32), torch.rand(G, 5, 1, 8, 8, dtype=torch.float64)
    if modality == "neuromorphic":
        return (DataMeta("toy", "neuromorphic", 3, (2, 2, 6, 6), torch.float32),
                torch.rand(G, 5, 2, 2, 6, 6, dtype=torch.float64))
    if modality == "physiological":
        return DataMeta("toy", "physiological", 3, (1, 12), torch.float32), torch.randn(G, 5, 1, 12, dtype=torch.float64)
    return DataMeta("toy", "text", 3, (6,), torch.int64, vocab_size=20), torch.randint(0, 20, (G, 5, 6))


@pytest.mark.parametrize("arch", ["mlp", "bimodal_true", "physics_lagrangian", "cnn"])
@pytest.mark.parametrize("modality", ["vision", "text", "neuromorphic", "physiological"])
@pytest.mark.parametrize("keep", [[0, 2], [1]])
def test_every_batched_architecture_sheds_members(arch, modality, keep):
    """Members [0, 2] (or [1] alone) of a 3-member batched model, carried into a model built for
    them, compute what they computed in the big one, and train on the same (Adam, float64)."""
    meta, x = _meta_and_input(modality, 3)
    seeds = [3, 4, 5]
    old = models.build(arch, meta, width=16, num_models=3, seeds=seeds, dtype=torch.float64, batched=True)
    assert trainer._compactable(old, 3)
    ps = list(old.parameters())
    opt = torch.optim.Adam(ps, lr=0.01)

    def step(m, o, xs, G):  # each member's own objective, summed (as the trainer's loss)
        o.zero_grad()
        out = trainer._as_group(m(xs), G)
        (out.square().flatten(1).mean(1).sum() + 1e-3 * trainer._energy(m, G).sum()).backward()
        o.step()

    step(old, opt, x, 3)
    pos = torch.tensor(keep)
    new = models.build(arch, meta, width=16, num_models=len(keep), seeds=[seeds[g] for g in keep],
                       dtype=torch.float64, batched=True)
    nps = list(new.parameters())
    nopt = torch.optim.Adam(nps, lr=0.01)
    trainer._carry_over(old, opt, ps, new, nopt, nps, pos)
    xk = x[pos]
    with torch.no_grad():
        big = old(x)[pos]
        small = trainer._as_group(new(xk[0] if len(keep) == 1 else xk), len(keep))
    torch.testing.assert_close(small, big, rtol=1e-12, atol=1e-12)
    step(old, opt, x, 3)
    step(new, nopt, xk[0] if len(keep) == 1 else xk, len(keep))
    for g_new, g_old in enumerate(keep):
        for a, b in zip(trainer.member_tensors(old, 3)[g_old], trainer.member_tensors(new, len(keep))[g_new]):
            torch.testing.assert_close(b.reshape(a.shape), a, rtol=1e-10, atol=1e-12)
