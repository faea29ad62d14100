"""report.html in a real browser: headless Chromium takes a screenshot and the embedded
figures must show up in it (coloured plot pixels; a corrupted copy of the page must not).
Each figure's layout at the size it is shown is checked without a browser (always runs)."""
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from minaction.report import build_report
from doubles.stores import make_synthetic_store

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and os.path.exists(p)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="Chromium is not installed (Debian: apt-get install chromium)")
HEIGHT = 14000  # the page grew past 10,000 px when Finding 3 showed both training times (session 26)


def _screenshot(html, png, profile):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           f"--screenshot={png}", f"--window-size=1200,{HEIGHT}", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert png.is_file(), f"Chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    from PIL import Image

    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


def _plot_bands(img):
    """Vertical bands of rows holding many saturated (plot-coloured) pixels; text and tables
    are grey, and a broken-image icon has only a few coloured pixels."""
    sat = (img.max(axis=2) - img.min(axis=2)) > 80
    per_row = sat.sum(axis=1)
    rows = np.where(per_row > 3)[0]
    if len(rows) == 0:
        return sat, []
    bands = np.split(rows, np.where(np.diff(rows) > 60)[0] + 1)
    return sat, [b for b in bands if per_row[b].sum() > 300]


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    db = make_synthetic_store(d / "s.sqlite", sweep_datasets=("mnist",), lams=(0.0, 1e-4, 1e-2), seeds=3,
                              datasets={"mnist": "vision", "sst2": "text", "ecg5000": "physiological"})
    build_report(db, d / "out", n_boot=20)
    return d


@needs_chromium
def test_figures_render_in_chromium(small_report):
    d = small_report
    html = d / "out" / "report.html"
    n_fig = len(re.findall(r"<img ", html.read_text()))
    assert n_fig >= 3
    img = _screenshot(html, d / "shot.png", d / "profile")
    nonwhite = np.where((img < 250).any(axis=(1, 2)))[0]
    assert len(nonwhite) and nonwhite.max() < HEIGHT - 1, "the page is taller than the screenshot"
    sat, bands = _plot_bands(img)
    assert len(bands) >= n_fig, f"{len(bands)} coloured bands for {n_fig} figures"
    assert sat.sum() > 2000 * n_fig


@needs_chromium
def test_broken_images_are_detected(small_report):
    """Negative control: the same page with the image data corrupted shows no plots."""
    d = small_report
    html = (d / "out" / "report.html").read_text()
    broken = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,AAAA", html)
    page = d / "broken.html"
    page.write_text(broken)
    img = _screenshot(page, d / "broken.png", d / "profile2")
    sat, bands = _plot_bands(img)
    assert sat.sum() < 500 and len(bands) == 0


# --- each figure checked at the size it is shown (no Chromium needed) --------------------

TEN = {"mnist": "vision", "fashion_mnist": "vision", "sst2": "text", "20newsgroups": "text", "nmnist": "neuromorphic",
       "mnist_spikes": "neuromorphic", "fmnist_spikes": "neuromorphic", "ecg5000": "physiological",
       "ecg200": "physiological", "eog": "physiological"}


@pytest.mark.parametrize("datasets, archs", [
    (TEN, ("mlp", "cnn", "bimodal_true", "physics_lagrangian")),  # a full factorial store
    ({"mnist": "vision", "fashion_mnist": "vision"}, ("mlp", "bimodal_true", "physics_lagrangian")),  # a λ-sweep
    ({"mnist": "vision"}, ("mlp",)),
])
def test_own_figures_have_no_layout_problems(tmp_path, datasets, archs):
    from minaction.report import figures, lambda_sweep, load_store
    from minaction.report.finding1 import cell_stats as _cell_stats

    db = make_synthetic_store(tmp_path / "s.sqlite", datasets=datasets, archs=archs, seeds=3, seed=1,
                              sweep_datasets=tuple(datasets))
    runs = load_store(db).runs
    figures.PROBLEMS.clear()
    figures.interaction_plot(_cell_stats(runs, 0.95), tmp_path / "interaction.png")
    figures.sweep_plot(lambda_sweep(runs), tmp_path / "lambda_sweep.png")
    assert figures.PROBLEMS == {"interaction.png": [], "lambda_sweep.png": []}


@pytest.mark.parametrize("datasets,archs,drawn", [
    (TEN, ("mlp", "cnn", "bimodal_true", "physics_lagrangian"),
     {"interaction.png", "lambda_sweep.png", "efficiency.png", "learning_curves.png"}),
    ({"mnist": "vision", "fashion_mnist": "vision"}, ("mlp", "bimodal_true", "physics_lagrangian"),
     {"interaction.png", "lambda_sweep.png", "learning_curves.png"}),  # one modality: no efficiency figure
])
def test_every_figure_of_a_report_has_no_layout_problems(tmp_path, datasets, archs, drawn):
    """All four of the report's figures go through the layout check (the efficiency and learning-curve figures
    did not: on the 750-run store the first had 7 px text, the second two empty panels, and the interaction
    figure's slanted dataset names overlapped)."""
    from minaction.report import build_report, figures

    db = make_synthetic_store(tmp_path / "s.sqlite", datasets=datasets, archs=archs, seeds=3, seed=1,
                              sweep_datasets=tuple(datasets))
    figures.PROBLEMS.clear()
    build_report(db, tmp_path / "o", n_boot=20)
    assert set(figures.PROBLEMS) == drawn
    assert {k: v for k, v in figures.PROBLEMS.items() if v} == {}


def test_layout_check_catches_bad_figures():
    """Negative control: an empty panel, overlapping labels, tiny text and a cut-off label."""
    from minaction.report.figures import _plt, layout_problems

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(4, 2))
    axes[0].plot([1, 2], [1, 2])
    axes[0].set_xticks([1, 1.02])
    axes[0].set_xticklabels(["a long label", "another long one"])
    axes[1].axhline(0, gid="ref")  # a reference line only: still an empty panel
    axes[1].set_ylabel("y", fontsize=3)
    axes[0].set_title("a title far too long to fit inside this little figure at all, it runs off")
    fig.set_dpi(80)
    probs = layout_problems(fig)
    plt.close(fig)
    text = " | ".join(probs)
    assert "empty panel" in text and "overlaps" in text and "smallest text" in text and "cut off" in text


def test_sweep_plot_colours_each_architecture_alike_in_every_row(tmp_path):
    """Rows with different architectures (a partial store: cnn swept on one dataset only) keep one colour per
    architecture and a legend naming every one (the legend came from the first row, colours from each row's
    own order: bimodal_true was drawn in cnn's colour and two architectures had no entry)."""
    import matplotlib.figure

    from minaction.report import figures

    rows = []
    for ds, archs in (("a_first", ["cnn"]), ("b_second", ["bimodal_true", "mlp", "physics_lagrangian"])):
        for arch in archs:
            for lam in (1e-4, 1e-3):
                rows.append({"dataset": ds, "arch": arch, "lam": lam, "E_ratio": 0.5, "E_ratio_lo": 0.4,
                             "E_ratio_hi": 0.6, "Eresc_ratio": 0.7, "d_acc_pp": 0.1, "d_acc_pp_lo": 0.0,
                             "d_acc_pp_hi": 0.2, "active_frac": 0.5, "active_frac_0": 0.6})
    seen = {}
    orig = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        for ax in fig.axes:
            for line in ax.get_lines():
                if not line.get_label().startswith("_"):
                    seen.setdefault(line.get_label(), set()).add(line.get_color())
        seen["legend"] = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        return orig(fig, *a, **k)

    matplotlib.figure.Figure.savefig = spy
    try:
        figures.sweep_plot(pd.DataFrame(rows), tmp_path / "lambda_sweep.png")
    finally:
        matplotlib.figure.Figure.savefig = orig
    archs = ["bimodal_true", "cnn", "mlp", "physics_lagrangian"]
    assert all(a in seen["legend"] for a in archs)
    colours = [seen[a] for a in archs]
    assert all(len(c) == 1 for c in colours) and len(set().union(*colours)) == 4
