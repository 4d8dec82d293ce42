"""`flax_adapters/` itself never imports torch: every module imports with torch made unimportable."""

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys
sys.modules['torch'] = None  # `import torch` now raises ImportError
sys.modules['transformers'] = None
sys.modules['peft'] = None
import flax_adapters
names = [m.name for m in pkgutil.walk_packages(flax_adapters.__path__, 'flax_adapters.')]
for name in names:
  importlib.import_module(name)
print(len(names))
"""


def test_every_flax_adapters_module_imports_without_torch():
  out = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert int(out.stdout.strip().splitlines()[-1]) >= 20  # the walk really visited the package
