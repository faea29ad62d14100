"""The interleaved benchmark scripts run (tiny sizes, few rounds: a smoke test; no timing is asserted)."""
import sys
from pathlib import Path

import pytest

from minaction.backends import select as mbackend

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.skipif(not mbackend.available("cpu")[0], reason="C++ backend unavailable")


@pytest.fixture()
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    yield
    for name in ("step_ratio", "step_phases", "shed_stopped", "full_estimate", "convert_step"):
        sys.modules.pop(name, None)


def test_step_ratio_has_the_glue_floor(bench_path, capsys):
    import torch

    import step_ratio

    threads = torch.get_num_threads()
    try:
        res = step_ratio.main(["--sizes", "12,6,5,3", "--batch", "4", "--rounds", "3", "--warmup", "1",
                               "--no-compile", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert set(res["variants"]) == {"plain", "naive", "fused", "penalty", "glue"}
    assert res["variants"]["plain"]["step"]["ratio_to_plain"] == 1.0
    out = capsys.readouterr().out
    assert "glue" in out and "penalty" in out


def test_step_ratio_interleaves_only_the_variants_asked_for(bench_path, capsys):
    import torch

    import step_ratio

    threads = torch.get_num_threads()
    try:
        res = step_ratio.main(["--sizes", "12,6,5,3", "--batch", "4", "--rounds", "3", "--warmup", "1",
                               "--no-compile", "--threads", "1", "--variants", "penalty"])
        assert set(res["variants"]) == {"plain", "penalty"}
        with pytest.raises(SystemExit):
            step_ratio.main(["--sizes", "12,6,3", "--no-compile", "--variants", "penalty,bogus"])
    finally:
        torch.set_num_threads(threads)
    assert "--variants: bogus not among plain, naive, fused, penalty, glue" in capsys.readouterr().err


def test_step_ratio_penalty_variant_trains_the_same_objective(bench_path):
    """The bench's `penalty` step (lambda inside the layers, loss = CE) and its `fused` step (CE + lambda * E)
    compute the same gradients from the same weights: the two variants time the same training."""
    import torch

    import step_ratio

    sizes, lam = [12, 6, 5, 3], 0.3
    x, y = torch.randn(4, 12), torch.randint(0, 3, (4,))
    grads = {}
    for kind in ("fused", "penalty"):
        model = step_ratio.build(kind, sizes)
        step_ratio.make_step(kind, model, lam)  # sets the penalty for "penalty"
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if kind == "fused":
            loss = loss + lam * __import__("minaction").total_energy(model)
        loss.backward()
        grads[kind] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["fused"], grads["penalty"]):
        torch.testing.assert_close(a, b)


def test_step_ratio_epilogue_and_allocator_pin(bench_path):
    import torch

    import step_ratio

    threads = torch.get_num_threads()
    try:
        res = step_ratio.epilogue_bench(2, shape=(1, 8, 16))
    finally:
        torch.set_num_threads(threads)
    assert set(res) == {"relu+l2", "relu+l1", "gelu+l2", "silu+l2", "tanh+l2", "sigmoid+l2", "gelu_tanh+l2"}
    assert all(r["ratio"] > 0 for r in res.values())


def test_step_phases_runs_every_variant(bench_path, capsys):
    import torch

    import step_phases

    threads = torch.get_num_threads()
    try:
        res = step_phases.main(["--sizes", "12,6,5,3", "--batch", "4", "--rounds", "3", "--warmup", "1",
                                "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert set(res) == {"plain", "fused", "fused_noE", "penalty", "glue"}
    assert set(res["fused"]["phases_us"]) == set(step_phases.PHASES)
    assert "fused_noE" in capsys.readouterr().out


def test_shed_stopped_times_both_ways_with_the_same_results(bench_path, monkeypatch, tmp_path):
    import torch

    import doubles.study  # noqa: F401  (the dataset "synthetic" and the architecture "tiny_mlp")
    import shed_stopped

    monkeypatch.setenv("MINACTION_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        res = shed_stopped.main(["--arch", "tiny_mlp", "--dataset", "synthetic", "--members", "3"])
    finally:
        torch.set_num_threads(threads)
    assert res["same_results"] and len(res["keep_s"]) == len(res["shed_s"]) == 1 and len(res["epochs"]) == 3


def test_full_estimate_weights_the_plan_by_stopping_epochs(bench_path, tmp_path):
    import json
    import sqlite3

    import full_estimate

    db = tmp_path / "s.sqlite"
    con = sqlite3.connect(db)
    con.execute("create table runs (arch text, dataset text, lam real, epochs integer, status text)")
    # mlp x mnist: two groups (two lambdas) of two seeds; epochs 10, 20 | 4, 6; a failed run is ignored
    con.executemany("insert into runs values (?, ?, ?, ?, ?)",
                    [("mlp", "mnist", 0.0, 10, "done"), ("mlp", "mnist", 0.0, 20, "done"),
                     ("mlp", "mnist", 1e-3, 4, "done"), ("mlp", "mnist", 1e-3, 6, "done"),
                     ("mlp", "mnist", 1e-3, 1, "failed")])
    con.commit()
    con.close()
    plan = {"workers": 2, "rows": [
        {"arch": "mlp", "dataset": "mnist", "runs": 4, "epochs_cap": 30, "member_epoch_s": 900.0},
        {"arch": "mlp", "dataset": "mnist_spikes", "runs": 4, "epochs_cap": 30, "member_epoch_s": 1800.0},
        {"arch": "cnn", "dataset": "sst2", "runs": 2, "epochs_cap": 10, "member_epoch_s": 3600.0}]}
    pj = tmp_path / "plan.json"
    pj.write_text(json.dumps(plan))
    res = full_estimate.main(["--plan-json", str(pj), "--store", str(db)])
    rows = {(r["arch"], r["dataset"]): r for r in res["rows"]}
    m = rows[("mlp", "mnist")]
    assert m["mean_epochs"] == 10.0 and m["group_max_epochs"] == 13.0  # (20 + 6) / 2
    assert m["cap_h"] == 4 * 900 * 30 / 3600 / 2 and m["now_h"] == 4 * 900 * 10 / 3600 / 2
    assert m["before_h"] == 4 * 900 * 13 / 3600 / 2
    s = rows[("mlp", "mnist_spikes")]
    assert s["mean_epochs"] == 10.0 and "mnist" in s["stand_in"]  # the source dataset's epochs
    c = rows[("cnn", "sst2")]
    assert c["now_h"] == c["cap_h"] == 10.0 and "at the cap" in c["stand_in"]  # nothing to borrow
    assert res["total"]["now_h"] == m["now_h"] + s["now_h"] + c["now_h"]
    # several plans: each block's median member-epoch cost
    plans = []
    for k, f in enumerate((1.0, 1.2, 0.7)):
        p = {"workers": 2, "rows": [dict(r, member_epoch_s=r["member_epoch_s"] * f) for r in plan["rows"]]}
        plans.append(tmp_path / f"plan{k}.json")
        plans[-1].write_text(json.dumps(p))
    args = [a for f in plans for a in ("--plan-json", str(f))]
    res3 = full_estimate.main(args + ["--store", str(db)])
    assert res3["total"]["now_h"] == pytest.approx(res["total"]["now_h"])  # the median plan is the first
    bad = dict(plan, rows=plan["rows"][::-1])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="different blocks"):
        full_estimate.main(["--plan-json", str(pj), "--plan-json", str(tmp_path / "bad.json"), "--store", str(db)])


def test_readme_python_examples_run():
    """Every ```python block of the README runs as written (a fresh interpreter each)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "no python example in the README"
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README example failed:\n{code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("style", ["modules", "functional"])
def test_convert_step_runs_every_variant_on_the_same_objective(bench_path, style):
    """bench/convert_step.py: the hand-written penalty and the converted model train the same loss."""
    import torch

    import convert_step

    steps = convert_step.make_steps(width=4, blocks=1, style=style)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 6, 6, generator=g), torch.randint(0, 10, (3,), generator=g)
    losses = {k: [float(step(x, y)) for _ in range(2)] for k, step in steps.items()}
    assert losses["hand"] == pytest.approx(losses["converted"], rel=1e-5)
    assert losses["plain"][0] < losses["hand"][0]  # the energy term is there
    res = convert_step.run(rounds=2, batch=2, size=6, width=4, blocks=1, warmup=1, style=style)
    assert set(res) == {"plain", "hand", "converted"} and res["plain"]["ratio"] == 1.0


def test_zoo_convert_reports_each_model_and_names_missing_libraries(bench_path):
    """bench/zoo_convert.py on a stand-in zoo (the real zoos are not dependencies): a row per model."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import zoo_convert

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))

    def stand_in():
        yield "local/net", Net, lambda: (torch.randn(2, 3, 8, 8),)
        yield "local/broken", lambda: 1 / 0, lambda: ()

    def missing():
        import not_a_library_here  # noqa: F401
        yield from ()

    rows = zoo_convert.run(["local", "missing"], {"local": stand_in, "missing": missing})
    assert rows[0]["kinds"] == {"ActivationObserver": 1} and rows[0]["max_rel_diff"] == 0.0
    assert rows[0]["energy"] > 0 and rows[0]["converted"] == 1
    assert "ZeroDivisionError" in rows[1]["error"] and "not installed" in rows[2]["error"]
    text = zoo_convert.table(rows)
    assert "local/net" in text and "ActivationObserver 1" in text and "**" in text


def test_group_invariance_cost_runs():
    """bench/group_invariance_cost.py (the per-member Adam and embedding backward against the whole-tensor
    ones): two rounds, every row printed with a ratio."""
    import subprocess

    r = subprocess.run([sys.executable, str(BENCH / "group_invariance_cost.py"), "2"], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5 and all(float(line.rstrip(" |").rsplit("|", 1)[1]) > 0 for line in rows), r.stdout


def test_gpu_models_check_runs_on_the_cpu(bench_path, capsys):
    """bench/gpu_models_check.py (run by gpu_check.sh with --device cuda) works: here on the CPU against itself."""
    import gpu_models_check

    try:
        assert gpu_models_check.main(["--device", "cpu"]) == 0
    finally:
        sys.modules.pop("gpu_models_check", None)
    out = capsys.readouterr().out
    assert out.count("ok   ") == 32 and "0 problem(s)" in out  # 4 archs x 4 stems x (float64, float32)
