import subprocess
import sys


def test_importing_the_runtime_does_not_import_torch_or_the_toolchain():
    code = (
        "import sys, pkgutil, importlib, pocketlm.runtime as r\n"
        "for m in pkgutil.iter_modules(r.__path__): importlib.import_module('pocketlm.runtime.' + m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or m.startswith('pocketlm.toolchain'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
