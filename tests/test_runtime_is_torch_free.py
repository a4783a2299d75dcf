import subprocess
import sys


def test_importing_the_runtime_does_not_import_torch_or_the_toolchain():
    code = (
        "import sys, pkgutil, importlib, pocketlm.runtime as r\n"
        "for m in pkgutil.walk_packages(r.__path__, 'pocketlm.runtime.'): importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or m.startswith('pocketlm.toolchain'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_import_check_reaches_subpackages():
    """walk_packages must see runtime.backends.* and runtime.quant.*, or the check above proves little."""
    import pkgutil

    import pocketlm.runtime as r

    names = {m.name for m in pkgutil.walk_packages(r.__path__, "pocketlm.runtime.")}
    assert {"pocketlm.runtime.quant.fixed_point", "pocketlm.runtime.backends.onnx"} <= names
