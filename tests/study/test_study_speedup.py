"""bench/study_speedup.py: the plain-PyTorch runner's models are the library's architectures
(same function, weight for weight), the slice preset keeps the faithful budget, and the script
produces its tables at a tiny size (no timing is asserted)."""
import importlib.util
import math
import sys
from pathlib import Path

import doubles.study  # noqa: F401  (registers the dataset "synthetic" and the tiny_* architectures)
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ss():
    spec = importlib.util.spec_from_file_location("study_speedup", ROOT / "bench" / "study_speedup.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["study_speedup"] = mod
    spec.loader.exec_module(mod)
    return mod


def _metas():
    from minaction.data import DataMeta

    f32 = torch.float32
    return {
        "vision": DataMeta(name="img", modality="vision", num_classes=10, input_shape=(1, 12, 12), input_dtype=f32),
        "text": DataMeta(name="txt", modality="text", num_classes=3, input_shape=(16,), input_dtype=torch.int64,
                         vocab_size=50),
        "neuromorphic": DataMeta(name="ev", modality="neuromorphic", num_classes=4, input_shape=(3, 2, 10, 10),
                                 input_dtype=f32),
        "physiological": DataMeta(name="ser", modality="physiological", num_classes=5, input_shape=(1, 40),
                                  input_dtype=f32),
    }


BUDGET = {"energy": "l2", "activation": "relu", "energy_reduction": "sum", "width": 0, "depth": 0}


@pytest.mark.parametrize("modality", ["vision", "text", "neuromorphic", "physiological"])
@pytest.mark.parametrize("arch", ["mlp", "cnn", "bimodal_true", "physics_lagrangian"])
def test_plain_model_is_the_library_architecture(ss, arch, modality):
    """With the library model's weights copied in, the plain model gives the same logits and the same
    activation energy (sum over hidden layers of the batch mean of sum(act^2)) in float64."""
    from minaction import models
    from minaction.model_api import total_energy

    meta = _metas()[modality]
    plain = ss.build_plain(arch, meta, BUDGET).double()
    lib = models.build(arch, meta, seeds=[5]).double()
    pp, lp = list(plain.parameters()), list(lib.parameters())
    assert [p.shape for p in pp] == [p.shape for p in lp]
    with torch.no_grad():
        for a, b in zip(pp, lp):
            a.copy_(b)
    g = torch.Generator().manual_seed(1)
    if modality == "text":
        x = torch.randint(1, 50, (6, 16), generator=g)
        x[:, 10:] = 0
        x[0] = 0  # an all-padding sample
    else:
        x = torch.rand(6, *meta.input_shape, generator=g, dtype=torch.float64)
    logits, energy = plain(x)
    ref = lib(x)
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(energy, total_energy(lib), rtol=1e-10, atol=1e-12)


def test_plain_runner_refuses_other_energies(ss):
    with pytest.raises(ValueError, match="l2"):
        ss.build_plain("mlp", _metas()["vision"], dict(BUDGET, energy="l1"))


def test_parse_slice(ss):
    assert ss.parse_slice("diagonal") == list(ss.DIAGONAL)
    grid = ss.parse_slice("grid")
    assert len(grid) == 16 and {a for a, _ in grid} == set(ss.ARCHS)
    assert ss.parse_slice("mlp:ecg200, cnn:mnist") == [("mlp", "ecg200"), ("cnn", "mnist")]
    for bad in ("nope", "mlp", "resnet:mnist", "mlp:"):
        with pytest.raises(ValueError, match="--slice"):
            ss.parse_slice(bad)


def test_slice_preset_keeps_the_faithful_budget(ss, tmp_path):
    """Written as TOML and read back by the study's own preset loader: exactly the named cells,
    the full preset's budget per dataset except the stated reductions."""
    from minaction.study.presets import expand, load_preset, run_config

    sizes = {"mnist": 54000, "ecg5000": 450}
    cells = [("cnn", "mnist"), ("mlp", "ecg5000")]
    spec = ss.slice_spec(cells, range(3), [1e-4], 1024, 20, 300, 400, n_train=sizes.get)
    path = tmp_path / "s.toml"
    ss.write_toml(spec, path)
    runs = expand(load_preset(path))
    assert sorted({(r["config"]["arch"], r["config"]["dataset"]) for r in runs}) == sorted(cells)
    assert len(runs) == 6
    full = load_preset("full")
    for r in runs:
        b, ds = r["config"]["budget"], r["config"]["dataset"]
        ref = run_config(full, "mlp", ds, 0.0, 0)["budget"]
        for k in ("batch_size", "lr", "optimizer", "eval_every", "patience_epochs", "restore_best", "data_order",
                  "eval_batch_size", "width", "energy", "activation"):
            assert b[k] == ref[k], (ds, k)
        assert b["val_subset"] == 300 and b["test_subset"] == 400
    by = {r["config"]["dataset"]: r["config"]["budget"] for r in runs}
    assert by["mnist"]["train_subset"] == 1024 and by["mnist"]["epochs"] == 3  # 8 steps/epoch -> 20 steps
    assert by["ecg5000"]["train_subset"] == 0 and by["ecg5000"]["epochs"] == 5  # 4 steps/epoch, cap 200


def test_tables_from_rounds(ss):
    def rows(accs):
        return [{"arch": "mlp", "dataset": "ecg200", "seed": i, "status": "done", "test_acc": a, "seconds": 2.0}
                for i, a in enumerate(accs)]

    rounds = [{"plain": {"wall_s": 20.0, "rows": rows([0.80, 0.82, 0.81])},
               "library": {"wall_s": 8.0, "rows": rows([0.81, 0.80, 0.83])}}]
    s = ss.summarize(rounds, [("mlp", "ecg200")], 3, 2)
    assert math.isclose(s["ratio"], 2.5) and math.isclose(s["plain"]["runs_per_hour"], 3600 * 3 / 20)
    assert s["accuracy"][0]["equal"]
    text = ss.format_tables(s, {"slice": "mlp×ecg200", "seeds": 3, "lams": [0.0], "budget": "b",
                                "loads": {"plain": ["1 → 1"], "library": ["1 → 1"]}})
    assert "**2.50x**" in text and "| mlp × ecg200 |" in text and "yes" in text
    assert s["accuracy"][0]["plain_worker_s"] == 6.0 and "6.0 / 6.0 (1.00x)" in text


def _need(*names):
    from minaction import data

    for n in names:
        try:
            data.load(n, "test")
        except data.DataError as exc:
            pytest.skip(f"dataset {n!r} is not reachable on this machine: {exc}")


def test_quick_race_prints_the_tables(ss, capsys):
    _need("ecg200")
    assert ss.main(["--quick", "--slice", "mlp:ecg200,cnn:ecg200", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "`minaction study run`" in out and "plain PyTorch" in out and "ratio library / plain" in out
    assert "| mlp × ecg200 |" in out and "| cnn × ecg200 |" in out


def test_quick_profile_prints_the_table(ss, capsys):
    _need("ecg200")
    assert ss.main(["--profile", "mlp:ecg200", "--quick", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "| mlp × ecg200" in out and "backward" in out


def test_plan_estimate_scales_subset_evaluations(ss, monkeypatch, tmp_path):
    """--plan: the plan's own measurement per group, with validation and test timed on a subset and
    scaled by split size / subset size (synthetic data: val and test hold 64 samples each)."""
    from minaction.study import plan

    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path))
    seen = []

    def fake_measure(group, calibrate_steps):
        b = group[0]["config"]["budget"]
        seen.append((len(group), b["val_subset"], b["test_subset"]))
        return {"t_step": 0.5, "t_eval": 1.0, "t_test": 2.0, "t_setup": 0.0, "n_train": 256,
                "n_val": b["val_subset"], "steps_per_epoch": 4}

    monkeypatch.setattr(plan, "measure", fake_measure)
    spec = {"name": "p", "archs": ["tiny_mlp"], "datasets": ["synthetic"], "lams": [0.0], "seeds": [0, 1, 2],
            "budget": {"epochs": 2, "batch_size": 64, "eval_every": 0}}
    p = ss.plan_estimate(spec, workers=1, eval_subset=16)
    assert seen == [(3, 16, 16)]
    row = p["rows"][0]
    assert row["t_eval_s"] == 4.0 and row["n_train"] == 256  # 1.0 s on 16 of 64 samples
    assert math.isclose(p["est_serial_s"], 2 * (4 * 0.5 + 1 * 4.0) + 2.0 * 4)
