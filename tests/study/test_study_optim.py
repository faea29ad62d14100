"""The trainer's optimizers (minaction.study.optim) update to the same bits as torch.optim's,
keep its state layout (a checkpoint of either loads into the other), train a group exactly as
torch.optim did, and leave torch._dynamo unimported in a worker."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import doubles
import doubles.study  # noqa: F401  (registers the dataset "synthetic" and the tiny_* architectures)
from minaction.study import checkpoint, optim, presets, trainer

HANG_GUARD = 600  # s: only a hung child hits this


def _params(dtype, seed=0, shapes=((10, 7, 5), (10, 5), (3,), (10, 1, 4, 3))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _grads(params, step, skip=None):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i == skip else torch.randn(p.shape, generator=g, dtype=p.dtype) * (1 + step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_is_torch_fused_adam_bit_for_bit(dtype, wd):
    a, b = _params(dtype), _params(dtype)
    ours = optim.Adam(a, lr=3e-3, weight_decay=wd)
    ref = torch.optim.Adam(b, lr=3e-3, weight_decay=wd, fused=True)
    for step in range(6):
        for ps in (a, b):
            _grads(ps, step, skip=2 if step == 1 else None)  # a parameter without a gradient is left alone
        ours.step()
        ref.step()
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    for x, y in zip(a, b):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[x][k], ref.state[y][k]), k
            assert ours.state[x][k].dtype == ref.state[y][k].dtype, k


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sgd_is_torch_sgd_bit_for_bit(wd):
    a, b = _params(torch.float32), _params(torch.float32)
    ours, ref = optim.SGD(a, lr=0.1, weight_decay=wd), torch.optim.SGD(b, lr=0.1, weight_decay=wd)
    for step in range(4):
        for ps in (a, b):
            _grads(ps, step)
        ours.step()
        ref.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_state_dict_round_trips_with_torch_optim():
    """Same layout both ways: torch's state loads into ours and ours into torch's, and stepping on
    continues to the same bits."""
    a, b = _params(torch.float32), _params(torch.float32)
    ref = torch.optim.Adam(b, lr=1e-2, fused=True)
    ours = optim.Adam(a, lr=1e-2)
    for step in range(2):
        for ps in (a, b):
            _grads(ps, step)
        ours.step()
        ref.step()
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert sd_ours["param_groups"] == sd_ref["param_groups"]
    assert sd_ours["state"].keys() == sd_ref["state"].keys()
    for i in sd_ref["state"]:
        assert sd_ours["state"][i].keys() == sd_ref["state"][i].keys()
    c, d = _params(torch.float32, seed=1), _params(torch.float32, seed=1)
    with torch.no_grad():
        for x, y, z in zip(a, c, d):
            y.copy_(x)
            z.copy_(x)
    into_ours, into_ref = optim.Adam(c, lr=1e-2), torch.optim.Adam(d, lr=1e-2, fused=True)
    into_ours.load_state_dict(copy.deepcopy(sd_ref))  # as a checkpoint file gives it (the dicts share tensors)
    into_ref.load_state_dict(copy.deepcopy(sd_ours))
    for step in range(2, 4):
        for ps in (a, c, d):
            _grads(ps, step)
        ours.step()
        into_ours.step()
        into_ref.step()
    for x, y, z in zip(a, c, d):
        assert torch.equal(x, y) and torch.equal(x, z)
    with pytest.raises(ValueError, match="different number"):
        optim.Adam(_params(torch.float32)[:2]).load_state_dict(sd_ours)


def test_zero_grad_and_bad_settings():
    ps = _params(torch.float32)
    o = optim.Adam(ps)
    _grads(ps, 0)
    o.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in ps)
    o.zero_grad()
    assert all(p.grad is None for p in ps)
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.Adam([])
    with pytest.raises(ValueError, match="invalid Adam settings"):
        optim.Adam(ps, lr=-1.0)
    with pytest.raises(ValueError, match="floating-point"):
        optim.Adam([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        optim.make("rmsprop", ps, lr=0.1)


@pytest.mark.parametrize("arch,dataset,opt_name", [("tiny_mlp", "synthetic", "adam"), ("cnn", "synthetic_vision", "adam"),
                                                    ("physics_lagrangian", "synthetic_events", "adam"),
                                                    ("tiny_mlp", "synthetic", "sgd")])
def test_a_group_trains_as_with_torch_optim(tmp_path, monkeypatch, arch, dataset, opt_name):
    """The whole group (early stopping, compaction, evaluations) records the same numbers with
    torch.optim's fused Adam / SGD as with the trainer's own, both updating whole [G, ...] tensors (the
    trainer's per-member update, optim.Adam(members=G), is checked against torch.optim per member in
    test_study_group_invariance.py)."""
    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path / "cache"))
    real_make = optim.make
    monkeypatch.setattr(optim, "make", lambda *a, members=0, **kw: real_make(*a, **kw))
    monkeypatch.setattr(checkpoint, "after_save", None)
    spec = presets.load_preset({
        "name": "optim-test", "archs": [arch], "datasets": [dataset], "lams": [0.0, 1e-2], "seeds": [0, 1],
        "group_by": "seed+lam", "max_group": 10, "data_opts": {dataset: {"n": 64}},
        "budget": {"name": "t", "epochs": 4, "batch_size": 16, "width": 8, "eval_batch_size": 64, "eval_every": 2,
                   "dtype": "float32", "patience_epochs": 1, "lr": 0.05, "optimizer": opt_name,
                   "weight_decay": 1e-3}})
    ours = doubles.study.without_timings(trainer.train_group(doubles.study.one_group(spec)))

    def torch_make(name, params, lr, weight_decay=0.0, members=0):
        params = list(params)
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

    monkeypatch.setattr(optim, "make", torch_make)
    theirs = doubles.study.without_timings(trainer.train_group(doubles.study.one_group(spec)))
    assert ours == theirs


def test_a_worker_never_imports_torch_dynamo(tmp_path):
    """torch.optim and torch.use_deterministic_algorithms would import torch._dynamo (1.1-1.6 s in
    every fresh worker); a worker's group trains without it, deterministic algorithms on."""
    code = textwrap.dedent(f"""
        import os, sys
        os.environ["MINACTION_CACHE"] = {str(tmp_path / "cache")!r}
        import doubles.study
        from minaction.study import presets, trainer
        trainer.init_worker(1)
        import torch
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        spec = presets.load_preset({{"name": "w", "archs": ["tiny_mlp"], "datasets": ["synthetic"], "lams": [0.0],
            "seeds": [0, 1], "group_by": "seed", "max_group": 10, "data_opts": {{"synthetic": {{"n": 32}}}},
            "budget": {{"name": "t", "epochs": 1, "batch_size": 16, "width": 8, "eval_batch_size": 32}}}})
        recs = trainer.train_group(doubles.study.one_group(spec))
        assert all(r["run"]["status"] == "done" for r in recs), [r["run"].get("error") for r in recs]
        print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(doubles.TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "no dynamo"
