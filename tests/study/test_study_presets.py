"""Presets: the shipped files, run identity, grouping, and clear errors for bad presets."""
import pytest

from minaction.study import presets
from minaction.study.presets import PresetError, expand, load_preset, make_groups, run_id

MODALITY_OF = {"mnist": "vision", "fashion_mnist": "vision", "sst2": "text", "20newsgroups": "text",
               "nmnist": "neuromorphic", "mnist_spikes": "neuromorphic", "fashion_mnist_spikes": "neuromorphic",
               "ecg5000": "physiological", "ecg200": "physiological", "eog_horizontal": "physiological"}
ARCHS = ("mlp", "cnn", "bimodal_true", "physics_lagrangian")


def test_shipped_presets():
    assert {"smoke", "lambda-sweep", "factorial", "full"} <= set(presets.available_presets())
    smoke = load_preset("smoke")
    runs = expand(smoke)
    assert len(runs) == len(smoke["datasets"]) * 2 * 2 * 2
    assert len(smoke["archs"]) == 2 and len(smoke["lams"]) == 2 and len(smoke["seeds"]) == 2
    assert {MODALITY_OF[d] for d in smoke["datasets"]} == {"vision", "text", "neuromorphic", "physiological"}
    sweep = load_preset("lambda-sweep")
    assert sweep["lams"] == [0.0, 1e-5, 1e-4, 1e-3, 1e-2]
    assert set(sweep["datasets"]) == {"mnist", "fashion_mnist"} and len(sweep["seeds"]) == 10
    assert set(sweep["archs"]) == {"mlp", "bimodal_true", "physics_lagrangian"}
    fac = load_preset("factorial")
    assert len(fac["lams"]) == 1 and set(fac["archs"]) == set(ARCHS) and len(fac["seeds"]) == 10
    full = load_preset("full")
    fr = expand(full)
    assert len(fr) >= 2000
    assert {MODALITY_OF[r["config"]["dataset"]] for r in fr} == {"vision", "text", "neuromorphic", "physiological"}
    assert {r["config"]["arch"] for r in fr} == set(ARCHS)
    for r in fr[:3]:  # the training budget is part of every run's configuration
        assert {"epochs", "train_subset", "batch_size", "lr", "optimizer", "width"} <= set(r["config"]["budget"])


def test_run_identity():
    spec = load_preset("smoke")
    a, b = expand(spec), expand(load_preset("smoke"))
    assert [r["run_id"] for r in a] == [r["run_id"] for r in b]
    assert len({r["run_id"] for r in a}) == len(a)
    cfg = a[0]["config"]
    changed = dict(cfg, budget=dict(cfg["budget"], epochs=cfg["budget"]["epochs"] + 1))
    assert run_id(changed) != run_id(cfg)
    base = {"name": "x", "archs": ["a"], "datasets": ["d"], "seeds": [0]}
    ints, floats = expand(dict(base, lams=[0, 1])), expand(dict(base, lams=[0.0, 1.0]))
    assert [r["run_id"] for r in ints] == [r["run_id"] for r in floats]  # lam is normalised to float


def test_groups():
    spec = {"name": "g", "archs": ["a"], "datasets": ["d"], "lams": [0.0, 1.0], "seeds": list(range(5)),
            "group_by": "seed", "max_group": 3}
    spec = load_preset(spec)
    runs = expand(spec)
    g = make_groups(runs, "seed", 3)
    assert sorted(len(x) for x in g) == [2, 2, 3, 3]
    assert all(len({r["config"]["lam"] for r in x}) == 1 for x in g)
    assert len(make_groups(runs, "seed+lam", 10)) == 1
    assert len(make_groups(runs, "none", 10)) == 10


def test_budget_by_dataset_and_extra():
    spec = load_preset({"name": "x", "archs": ["a"], "datasets": ["d1", "d2"], "lams": [0], "seeds": [0],
                        "budget": {"epochs": 1}, "budget_by_dataset": {"d2": {"epochs": 4}},
                        "extra": [{"archs": ["b"], "datasets": ["d1"]}]})
    runs = expand(spec)
    ep = {(r["config"]["arch"], r["config"]["dataset"]): r["config"]["budget"]["epochs"] for r in runs}
    assert ep == {("a", "d1"): 1, ("a", "d2"): 4, ("b", "d1"): 1}


@pytest.mark.parametrize("bad, msg", [
    ({"archs": []}, "archs"),
    ({"seeds": [1.5]}, "seeds must be integers"),
    ({"group_by": "arch"}, "group_by"),
    ({"budget": {"epoch": 1}}, "unknown budget keys"),
    ({"colour": 1}, "unknown keys"),
    ({"budget": {"optimizer": "lbfgs"}}, "optimizer"),
    ({"budget": {"data_order": "random"}}, "data_order"),
    ({"budget": {"eval_every": -1}}, "eval_every"),
    ({"budget": {"patience_epochs": -2}}, "patience_epochs"),
    ({"budget": {"dtype": "float16"}}, "dtype"),
    ({"budget": {"restore_best": "yes"}}, "restore_best"),
    ({"budget": {"epochs": 0}}, "epochs"),
    ({"budget_by_dataset": {"d": {"eval_every": 1.5}}}, "budget_by_dataset.d: eval_every"),
    ({"lams": [0.0, "1e-3"]}, r"lams must be numbers, got '1e-3' \(a string: write it without quotes\)"),
    ({"lams": [True]}, "lams must be numbers"),
    ({"lams": [-1e-3]}, "lams must be finite and >= 0"),
    ({"lams": [float("nan")]}, "lams must be finite and >= 0"),
    ({"extra": [{"lams": ["x"]}]}, "extra block: lams must be numbers"),
    ({"budget": {"lr": 0}}, "lr must be a number > 0"),
    ({"budget": {"lr": "1e-3"}}, "lr must be a number > 0"),
    ({"budget": {"weight_decay": -0.1}}, "weight_decay must be a number >= 0"),
    ({"budget": {"width": 32.0}}, "width must be an integer >= 0"),
    ({"budget": {"depth": -1}}, "depth must be an integer >= 0"),
    ({"budget": {"eval_batch_size": 0}}, "eval_batch_size must be an integer >= 1"),
    ({"budget": {"data_seed": 1.5}}, "data_seed must be an integer"),
    ({"budget": {"energy": False}}, r'energy must be a string, got False \(energy = "none" for no energy\)'),
])
def test_bad_presets(bad, msg):
    spec = {"name": "x", "archs": ["a"], "datasets": ["d"], "lams": [0], "seeds": [0]}
    spec.update(bad)
    with pytest.raises(PresetError, match=msg):
        load_preset(spec)


def test_unknown_preset_name_and_bad_file(tmp_path):
    with pytest.raises(PresetError, match="unknown preset 'nope'.*smoke"):
        load_preset("nope")
    p = tmp_path / "bad.toml"
    p.write_text("archs = [\n")
    with pytest.raises(PresetError, match="invalid TOML"):
        load_preset(p)
    with pytest.raises(PresetError, match="does not exist"):
        load_preset(tmp_path / "missing.toml")


FAITHFUL = ("lambda-sweep", "factorial", "full")


def test_faithful_presets_train_on_full_splits_with_early_stopping():
    for name in FAITHFUL:
        spec = load_preset(name)
        for r in expand(spec):
            b = r["config"]["budget"]
            assert b["name"] == "faithful", name
            # the whole training split, the whole official test split, the whole validation split
            assert b["train_subset"] == b["val_subset"] == b["test_subset"] == 0, (name, r["config"]["dataset"])
            if r["config"]["dataset"] == "ecg200":
                # its 10-series validation split cannot pick a checkpoint (docs/replication/baseline-gaps.md):
                # a fixed 300 epochs, the last weights tested
                assert b["patience_epochs"] == 0 and b["restore_best"] is False and b["epochs"] == 300
            else:
                assert b["patience_epochs"] > 0 and b["restore_best"] is True and b["epochs"] >= 30
            assert b["eval_every"] >= 1 and b["data_order"] == "seed"
            if r["config"]["dataset"] == "nmnist":  # one time bin per saccade, kept apart as channels
                assert r["config"]["data_opts"] == {"T": 3, "fold_time": True}, name
    # several evaluations per epoch where epochs are long (mnist: 54,000 / 128 = 422 steps)
    b = expand(load_preset("lambda-sweep"))[0]["config"]["budget"]
    assert 422 / b["eval_every"] >= 3


def test_quick_preset_keeps_todays_budgets_and_says_so():
    quick = load_preset("quick")
    b = quick["budget"]
    assert b["name"] == "quick" and b["train_subset"] == 2000 and b["epochs"] == 3 and b["patience_epochs"] == 0
    assert "too small" in quick["description"]
    assert {r["config"]["arch"] for r in expand(quick)} == set(ARCHS)
    smoke = load_preset("smoke")
    assert smoke["budget"]["name"] == "smoke"


def test_every_run_records_its_budget_and_data_order():
    for name in ("smoke", "quick") + FAITHFUL:
        for r in expand(load_preset(name))[:5]:
            b = r["config"]["budget"]
            assert {"name", "epochs", "patience_epochs", "eval_every", "restore_best", "data_order", "data_seed",
                    "train_subset", "test_subset"} <= set(b)
            assert r["config"]["trainer_version"] == presets.TRAINER_VERSION >= 2


def test_presets_read_toml_without_tomllib():
    """Python 3.10 (which pyproject allows) has no tomllib: the presets then read TOML with tomli, a
    dependency there (every `study` command failed to import on 3.10)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, types, tomllib as real
        sys.modules["tomllib"] = None  # as on Python 3.10
        fake = types.ModuleType("tomli")
        fake.loads, fake.TOMLDecodeError = real.loads, real.TOMLDecodeError
        sys.modules["tomli"] = fake
        from minaction.study import presets
        assert presets.tomllib is fake
        print(len(presets.expand("smoke")) > 0)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]


def test_make_groups_refuses_what_would_drop_runs(tmp_path):
    """max_group=-1 returned no group (every run vanished), 0 raised a range() error, and an unknown group_by
    grouped as "seed". run_study refuses an unknown executor before it creates the store."""
    import pytest

    from minaction.study import presets as P
    from minaction.study import run_study

    runs = P.expand("smoke")
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match="max_group must be a positive integer"):
            P.make_groups(runs, "seed", bad)
    with pytest.raises(ValueError, match="group_by must be one of"):
        P.make_groups(runs, "bogus", 10)
    assert sum(len(g) for g in P.make_groups(runs, "none", 10)) == len(runs)
    db = tmp_path / "s.sqlite"
    with pytest.raises(ValueError, match="unknown executor 'bogus'"):
        run_study("smoke", db, executor="bogus", progress=False)
    assert not db.exists()
