"""A user's own plain-PyTorch model in the study (the pattern of docs/models.md: one converted copy per
seed in a LoopEnsemble), and the preset checks a plugin user runs into: misspelt dataset tables, a
refused preset leaving no store, a preset name reused with another budget, a checkpoint key that
follows the plugin's source."""
import importlib
import sqlite3
import sys
import textwrap

import pytest
import torch

import doubles.study  # noqa: F401  (registers the dataset "synthetic" and the tiny_* architectures)
from minaction import models
from minaction.study import checkpoint, presets, run_study, trainer
from minaction.study.runner import StudyConfigError, check_config

PLUGIN = textwrap.dedent("""
    import torch
    from torch import nn
    import minaction
    from minaction import models


    class Net(nn.Module):  # a plain model, as a user writes it
        def __init__(self, d_in, classes, width):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d_in, width), nn.Linear(width, classes)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))


    def d_in(meta):
        n = 1
        for s in meta.input_shape:
            n *= s
        return n


    def build(name, meta, num_models=1, seeds=None, width=0, **options):
        members = []
        for s in seeds or [0] * num_models:
            torch.manual_seed(s)
            net = Net(d_in(meta), meta.num_classes, width or 12)
            members.append(net if name == "plain_raw" else minaction.convert(net))
        return members[0] if num_models == 1 else models.LoopEnsemble(members, meta=meta)


    models.register_architecture("plain_loop", build)
    models.register_architecture("plain_raw", build)
""")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    d = tmp_path_factory.mktemp("userplug")
    (d / "user_plain_plugin.py").write_text(PLUGIN)
    sys.path.insert(0, str(d))
    try:
        yield importlib.import_module("user_plain_plugin")
    finally:
        sys.path.remove(str(d))


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path / "cache"))


def spec(arch="plain_loop", seeds=(0, 1, 2), **over):
    s = {"name": "plain-test", "archs": [arch], "datasets": ["synthetic"], "lams": [1e-2], "seeds": list(seeds),
         "group_by": "seed", "max_group": 10, "data_opts": {"synthetic": {"n": 64}},
         "budget": {"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "dtype": "float64", "lr": 0.05}}
    s.update(over)
    return presets.load_preset(s)


def test_a_plain_model_trains_as_a_group_exactly_as_alone(plugin):
    """Three seeds of the converted plain model in one LoopEnsemble record what each seed records
    trained alone (float64), with a [G] energy from total_energy."""
    together = doubles.study.without_timings(trainer.train_group(doubles.study.one_group(spec())))
    alone = [doubles.study.without_timings(trainer.train_group(doubles.study.one_group(spec(seeds=(s,)))))[0]
             for s in (0, 1, 2)]
    for (run_g, rows_g), (run_a, rows_a) in zip(together, alone):
        assert run_g["status"] == run_a["status"] == "done"
        for k in ("test_acc", "test_loss", "test_energy", "val_acc", "epochs"):
            assert run_g[k] == pytest.approx(run_a[k], rel=1e-9, abs=1e-12), k
        assert run_g["test_energy"] > 0
    assert len({r["test_energy"] for r, _ in together}) == 3  # three different members


def test_a_plain_model_without_energy_layers_fails_naming_convert(plugin):
    with pytest.raises(ValueError, match="minaction.convert"):
        trainer.train_group(doubles.study.one_group(spec("plain_raw")))


def test_loop_ensemble_needs_the_input_shape(plugin):
    nets = [plugin.Net(64, 4, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="meta"):
        models.LoopEnsemble(nets)
    meta = doubles.study.load("synthetic", "train", n=8).meta
    m = models.LoopEnsemble([__import__("minaction").convert(n) for n in nets], meta=meta)
    x = torch.rand(2, 5, 1, 8, 8)
    assert m(x).shape == (2, 5, 4) and m(x[0]).shape == (2, 5, 4)  # per-member and shared inputs


def test_a_misspelt_dataset_table_is_refused_before_a_store_exists(tmp_path):
    bad = spec("tiny_mlp", budget_by_dataset={"synthetc": {"epochs": 3}})
    with pytest.raises(StudyConfigError, match=r"\[budget_by_dataset.synthetc\].*no known dataset"):
        check_config(presets.expand(bad), bad)
    db = tmp_path / "s.sqlite"
    with pytest.raises(StudyConfigError, match="synthetc"):
        run_study(bad, db, workers=1, progress=False)
    with pytest.raises(StudyConfigError, match="unknown architecture"):
        run_study(spec("tiny_mpl"), db, workers=1, progress=False)
    assert not db.exists() and not (tmp_path / "s.sqlite.lock").exists()  # nothing left behind
    ok = spec("tiny_mlp", data_opts={"synthetic": {"n": 64}, "mnist": {}})  # a known dataset the preset skips
    check_config(presets.expand(ok), ok)


def test_a_preset_name_reused_with_another_budget_is_said(tmp_path, capsys):
    db = tmp_path / "s.sqlite"
    run_study(spec("tiny_mlp", seeds=(0,)), db, workers=1, progress=False)
    run_study(spec("tiny_mlp", seeds=(0, 1)), db, workers=1, progress=False)  # more seeds: the same budget
    assert "already holds runs of a preset named" not in capsys.readouterr().err
    other = spec("tiny_mlp", seeds=(0,))
    other["budget"]["epochs"] = 1
    run_study(other, db, workers=1, progress=False)
    err = capsys.readouterr().err
    assert "already holds runs of a preset named 'plain-test' with another budget" in err
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0] == 3
    from minaction.report.store import MixedBudgetError, load_store, select_budget

    with pytest.raises(MixedBudgetError, match=r"--preset FILE\.toml .*plain-test recorded runs of more than one"):
        select_budget(load_store(db), preset="plain-test")


def test_the_checkpoint_key_follows_the_plugin_source(plugin, tmp_path, monkeypatch):
    runs = doubles.study.one_group(spec())
    key = checkpoint.group_key(runs)
    assert checkpoint.group_key(runs) == key
    copy = tmp_path / "edited_plugin.py"
    copy.write_text(PLUGIN + "\n# edited\n")
    monkeypatch.setattr(sys.modules["user_plain_plugin"], "__file__", str(copy))
    assert checkpoint.group_key(runs) != key
    assert checkpoint.plugin_version(doubles.study.one_group(spec("tiny_mlp"))) != ""


@pytest.mark.parametrize("opts, match", [({"T": 3}, r"takes no option\(s\) \['T'\]"),
                                         ({"val_fraction": "0.2"}, "option val_fraction must be a number")])
def test_a_bad_option_inside_data_opts_is_refused_before_a_store_exists(tmp_path, opts, match):
    """[data_opts.mnist] T = 3 (a key mnist does not take) or a string for a number: every run of the
    dataset was recorded failed with the loader's error; now one error before anything runs."""
    spec = presets.load_preset({"name": "dopt", "archs": ["mlp"], "datasets": ["mnist"], "lams": [0.0],
                                "seeds": [0], "budget": {"epochs": 1}, "data_opts": {"mnist": opts}})
    with pytest.raises(StudyConfigError, match=rf"\[data_opts.mnist\]: .*{match}"):
        check_config(presets.expand(spec), spec)
    db = tmp_path / "s.sqlite"
    with pytest.raises(StudyConfigError):
        run_study(spec, db, workers=1, progress=False)
    assert not db.exists()
