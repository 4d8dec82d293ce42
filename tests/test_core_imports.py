"""Issue 10, item 2: the core imports nothing from the genomics example or the HF model families."""

import subprocess
import sys

# Every module of flax_adapters except the example (genomics/) and the HF families (models/).
SCRIPT = r"""
import importlib, os, pkgutil, sys
import flax_adapters
APART = ('flax_adapters.genomics', 'flax_adapters.models')

def walk(path, prefix):  # pkgutil.walk_packages would import the packages it skips
  for m in pkgutil.iter_modules(path, prefix):
    if m.name.startswith(APART):
      continue
    yield m.name
    if m.ispkg:
      yield from walk([os.path.join(path[0], m.name.rsplit('.', 1)[-1])], m.name + '.')

names = list(walk(flax_adapters.__path__, 'flax_adapters.'))
for name in names:
  importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.startswith(APART))
print(len(names), loaded)
"""


def test_core_modules_leave_genomics_and_model_families_unimported():
  out = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  count, loaded = out.stdout.strip().splitlines()[-1].split(' ', 1)
  assert int(count) >= 15  # the walk really visited the core
  assert loaded == '[]', f'core modules imported {loaded}'
