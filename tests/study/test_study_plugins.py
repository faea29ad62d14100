"""Registered architectures and datasets reach the study's worker processes (minaction.study.plugins),
and the shipped package imports no test double."""
import subprocess
import sys
import textwrap

import doubles.study  # noqa: F401  (registers the dataset "synthetic" and the tiny_* architectures)
from minaction.study.plugins import import_plugins, plugins_for


def _run(code, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, **kw)


def test_plugins_for_names_the_registering_modules():
    runs = [{"config": {"arch": "tiny_mlp", "dataset": "synthetic"}},
            {"config": {"arch": "mlp", "dataset": "mnist"}}]
    (mod, root), = plugins_for(runs)
    assert mod == "doubles.study" and root == str(doubles.TESTS_DIR)
    assert plugins_for(runs[1:]) == []  # built-in names need no module


def test_import_plugins_registers_in_a_fresh_process(tmp_path):
    """A worker whose sys.path lacks the plugin's folder (a dask or ray worker) still imports it."""
    pkg = tmp_path / "myplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "reg.py").write_text(textwrap.dedent("""
        from minaction import data, models

        def load(name, split, data_dir=None, seed=0):
            raise NotImplementedError

        def build(arch, meta, **kw):
            raise NotImplementedError

        data.register_dataset("plug_ds", load)
        models.register_architecture("plug_arch", build)
    """))
    r = _run(f"""
        import sys
        from minaction.study.plugins import import_plugins
        from minaction import data, models
        assert "plug_arch" not in models.architecture_names()
        import_plugins([("myplug.reg", {str(tmp_path)!r})])
        assert "plug_arch" in models.architecture_names() and "plug_ds" in data.catalogue.REGISTERED
        print("ok")
    """, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    import_plugins([("doubles.study", None)])  # already imported: nothing happens


def test_package_imports_no_test_double():
    """Importing the study and the report loads no test double and registers no fake name; the report
    does not import the study runner."""
    r = _run("""
        import sys
        import minaction.report, minaction.models as m, minaction.data as d
        assert "minaction.study" not in sys.modules, "the report imported the study"
        import minaction.study, minaction.study.runner, minaction.study.trainer
        assert not [k for k in sys.modules if k.startswith("doubles") or k.endswith("synthetic")]
        assert m.architecture_names() == m.ARCHITECTURES and not d.catalogue.REGISTERED
        print("ok")
    """, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
