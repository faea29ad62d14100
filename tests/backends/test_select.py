"""Where the backends find their sources."""

def test_a_second_checkout_builds_its_own_sources(tmp_path):
    """A checkout imported with PYTHONPATH uses its own csrc/ and kernels/, even when an
    editable install of another checkout maps minaction._csrc and minaction.kernels."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    other = tmp_path / "checkout"
    other.mkdir()
    shutil.copytree(root / "minaction", other / "minaction", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "csrc", other / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "kernels", other / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "setup.py", other / "setup.py")
    code = ("import minaction, minaction.backends as b, minaction.kernels as k; "
            "print(b.source_dir()); print(k.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(other)}, check=True).stdout.split()
    assert Path(out[0]) == other / "csrc"
    assert Path(out[1]) == other / "kernels" / "__init__.py"


def test_the_kernels_folder_does_not_shadow_the_pypi_kernels_package(tmp_path):
    """Python started in the repository root sees kernels/ as a top-level package, which would shadow
    the PyPI package ``kernels`` (transformers imports it): that package is loaded in its place, and
    without it ``import kernels`` fails as it would anywhere else."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = "import kernels; print(kernels.__file__, kernels.WHO)"
    bare = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert bare.returncode != 0 and "not a top-level package" in bare.stderr
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'pypi'\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [str(site / "kernels" / "__init__.py"), "pypi"]
    both = subprocess.run([sys.executable, "-c", "import minaction.kernels as k, kernels; print(k.__file__, kernels.WHO)"],
                          cwd=root, capture_output=True, text=True, env=env, check=True)
    assert both.stdout.split() == [str(root / "kernels" / "__init__.py"), "pypi"]
