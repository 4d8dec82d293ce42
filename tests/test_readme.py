"""The README's promises: its two commands open it, CI runs the second, and its Python examples run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
  first_block = re.search(r'```bash\n(.*?)```', README, re.S)
  assert README.index('```bash') < README.index('\n## ')  # before any section: the README starts with them
  commands = first_block.group(1).strip().splitlines()
  assert len(commands) == 2
  demo, tests = commands
  assert 'pip install' in demo and 'python -m flax_adapters.genomics.demo' in demo
  assert 'torch==2.13.0' in tests and 'pytest' in tests
  assert tests in (ROOT / '.ci' / 'run').read_text()


def test_readme_python_examples_run():
  blocks = re.findall(r'```python\n(.*?)```', README, re.S)
  assert len(blocks) >= 8
  namespace = {}
  for i, block in enumerate(blocks):
    try:
      exec(compile(block, f'README.md python block {i}', 'exec'), namespace)  # pylint: disable=exec-used
    except Exception as e:
      raise AssertionError(f'README python block {i} failed:\n{block}') from e
