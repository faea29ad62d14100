"""Training FLOPs: counted on a measured training step (not 3 x the forward), the same for a run in
any group, and recounted in stores written by the older rule without retraining."""
import sqlite3

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import doubles.study  # noqa: F401  (registers the dataset "synthetic" and the tiny_* architectures)
from minaction import models
from minaction.data import DataMeta
from minaction.study import run_study
from minaction.study.archive import export_runs, import_runs
from minaction.study.recount import FLOPS_META, recount_flops
from minaction.study.trainer import training_flops_per_sample

from test_study_runner import synth


def _flops(db):
    con = sqlite3.connect(db)
    try:
        return dict(((r, s), f) for r, s, f in con.execute("SELECT run_id, step, flops FROM evals"))
    finally:
        con.close()


def _meta(db):
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT key, value FROM meta").fetchall())
    finally:
        con.close()


def _counted_flops(model, x, y, G):
    """torch's own count of one real training step (forward, CE + E, backward): the reference."""
    from torch.utils.flop_counter import FlopCounterMode

    from minaction.study.trainer import _as_group, _energy

    with FlopCounterMode(display=False) as fc:
        logits = _as_group(model(x), G)
        C = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, C), y.repeat(G), reduction="none").view(G, len(y)).mean(1)
        (ce + _energy(model, G).to(ce.dtype)).sum().backward()
    for p in model.parameters():
        p.grad = None
    return fc.get_total_flops()


IMAGE = DataMeta("img", "vision", 10, (1, 12, 12), torch.float32)
SERIES = DataMeta("ser", "physiological", 3, (1, 40), torch.float32)
EVENTS = DataMeta("ev", "neuromorphic", 4, (3, 2, 9, 9), torch.float32)
TEXT = DataMeta("txt", "text", 3, (10,), torch.int64, vocab_size=50)


def _batch(meta, n=5):
    if meta.modality == "text":
        x = torch.randint(1, meta.vocab_size, (n,) + tuple(meta.input_shape))
    else:
        x = torch.rand((n,) + tuple(meta.input_shape))
    return x, torch.randint(0, meta.num_classes, (n,))


@pytest.mark.parametrize("meta", [IMAGE, SERIES, EVENTS, TEXT], ids=["image", "series", "events", "text"])
@pytest.mark.parametrize("arch", ["mlp", "cnn", "bimodal_true", "physics_lagrangian"])
def test_step_count_equals_torchs_flop_counter_per_member_and_leaves_no_trace(arch, meta):
    """The hooked count (no dispatch mode, so no torch._dynamo in a worker) equals FlopCounterMode's count of a
    real training step (forward, CE + E, backward) for every architecture, stem and layout; it is the same for
    one member (member_dim) and three, and changes nothing."""
    x, y = _batch(meta)
    counts = []
    for G, kw in ((1, {"member_dim": True}), (1, {}), (3, {}), (2, {"batched": True} if arch == "cnn" else {})):
        m = models.build(arch, meta, width=12, num_models=G, seeds=list(range(G)), **kw)
        rng = torch.get_rng_state()
        c = training_flops_per_sample(m, x, G)
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(p.grad is None for p in m.parameters())
        if not (arch == "cnn" and kw.get("batched")):
            assert c == pytest.approx(_counted_flops(m, x, y, G) / (G * len(x)), rel=1e-12), (G, kw)
        # else: the batched cnn's convolutions are grouped (groups = G), and torch 2.13's FlopCounterMode counts a
        # grouped convolution's weight gradient G times (a plain nn.Conv2d with groups=2 or 4 shows it: the
        # backward per group grows with the groups); the per-member count must not depend on G, as checked below
        counts.append(c)
    assert counts[0] > 0 and len(set(counts)) == 1


def test_physics_lagrangian_force_product_is_counted():
    """The force -W_V^T r is a matrix product outside the energy layers: the old rule (forward hooks on
    the layers) missed it; the step count includes its forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    m = models.build("physics_lagrangian", SERIES, width=24, num_models=1, seeds=[0])
    x = torch.rand(4, 1, 40)
    y = torch.randint(0, 3, (4,))
    with FlopCounterMode(display=False) as fc:
        m(x)
    fwd_all = fc.get_total_flops() / 4
    layers = [0]
    hooks = [mod.register_forward_hook(lambda mod, i, o: layers.__setitem__(0, layers[0] + mod.forward_flops(
        tuple(i[0].shape), tuple((o[0] if isinstance(o, tuple) else o).shape))))
        for mod in m.modules() if hasattr(mod, "forward_flops")]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    assert fwd_all > layers[0] / 4 * 1.02  # the force product: more than the layers' own (bias-including) count
    assert training_flops_per_sample(m, x, 1) > 2 * fwd_all


def test_recount_restores_the_step_count_and_import_tracks_how_flops_were_counted(tmp_path):
    db = tmp_path / "s.sqlite"
    assert run_study(synth(seeds=[0, 1]), db, workers=1, progress=False)["done"] == 4
    assert _meta(db)[FLOPS_META] == "step"  # a new store is counted on a step
    good = _flops(db)
    con = sqlite3.connect(db)
    con.execute("UPDATE evals SET flops = flops * 1.7")  # what the older rule would have left
    con.execute("DELETE FROM meta WHERE key = ?", (FLOPS_META,))
    con.commit()
    con.close()
    arch_old = tmp_path / "old.jsonl.gz"
    export_runs(db, arch_old)
    out = recount_flops(db)
    assert out["runs"] == 4 and out["configurations"] == 1
    assert _flops(db) == pytest.approx(good) and _meta(db)[FLOPS_META] == "step"
    # archives carry the marker: an empty store takes the archive's; an unmarked archive unmarks a store
    arch_new = tmp_path / "new.jsonl.gz"
    export_runs(db, arch_new)
    fresh = tmp_path / "fresh.sqlite"
    import_runs(fresh, arch_new)
    assert _meta(fresh)[FLOPS_META] == "step"
    other = tmp_path / "other.sqlite"
    assert run_study(synth(seeds=[5]), other, workers=1, progress=False)["done"] == 2
    import_runs(other, arch_old)
    assert FLOPS_META not in _meta(other)
    recount_flops(other)
    assert _meta(other)[FLOPS_META] == "step"
    typo = tmp_path / "typo.sqlite"  # a mistyped path: refused, not a new store marked as recounted
    with pytest.raises(FileNotFoundError, match="no study store"):
        recount_flops(typo)
    assert not typo.exists()


def test_status_of_one_preset_sums_its_own_wall_time(tmp_path):
    """`study status --preset P` gave the whole store's done_wall_time_s beside P's counts (0 done)."""
    from minaction.study import study_status

    db = tmp_path / "s.sqlite"
    run_study(synth(seeds=[0, 1]), db, workers=1, progress=False)
    whole = study_status(db)["done_wall_time_s"]
    assert whole > 0
    assert study_status(db, preset=synth(seeds=[0, 1]))["done_wall_time_s"] == pytest.approx(whole)
    other = study_status(db, preset=synth(seeds=[7]))
    assert other["done"] == 0 and other["done_wall_time_s"] == 0


def test_report_says_when_flops_are_counted_by_the_older_rule(tmp_path):
    from minaction.report import build_report

    db = tmp_path / "s.sqlite"
    run_study(synth(seeds=[0, 1]), db, workers=1, progress=False)
    build_report(db, tmp_path / "r1", n_boot=10)
    assert "older rule" not in (tmp_path / "r1" / "report.md").read_text()
    con = sqlite3.connect(db)
    con.execute("DELETE FROM meta WHERE key = ?", (FLOPS_META,))
    con.commit()
    con.close()
    res = build_report(db, tmp_path / "r2", n_boot=10)
    md = (tmp_path / "r2" / "report.md").read_text()
    assert "recount-flops" in md.split("# Finding 3")[1]
    # said first, not only in Finding 3 (the summary and the figure use the same numbers), and by the command
    assert "older rule" in md.split("# The store")[0] and any("recount-flops" in n for n in res["notices"])


def test_count_of_a_converted_model_with_activation_layers_and_plain_logits():
    """A registered architecture built with convert: Conv -> BatchNorm -> ReLU gives an EnergyActivation,
    LeakyReLU an observer, and the logits stay a plain nn.Linear. The hooked count read .bias / .weight of the
    activation modules (AttributeError: every run of such a study failed) and left the plain logits out
    (35,840 against FlopCounterMode's 37,760 per sample in a trial)."""
    import minaction

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 12 * 12, 16), nn.LeakyReLU(), nn.Linear(16, 10))
    model = minaction.convert(plain)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear" in kinds  # the logits stay plain
    x, y = torch.randn(5, 1, 12, 12), torch.randint(0, 10, (5,))
    got = training_flops_per_sample(model, x, 1) * 5
    assert got == pytest.approx(_counted_flops(model, x, y, 1), rel=1e-12)
