"""Suite-wide settings: XLA compiles with LLVM's cheap passes only.

The suite's models are tiny, so most of its time is compiling, not running. `jax_disable_most_optimizations`
lowers only the backend's code generation (optimization level 0, no expensive LLVM passes); the HLO
passes (fusion, layout, algebraic simplification) still run, so the programs tested are the ones users
compile, in slower machine code. The environment variable carries it into the subprocesses the tests
start (notebook kernels, CLI runs, distributed workers). Speed is measured in `benchmarks/`, never here.
"""

import os

os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'

import jax

jax.config.update('jax_disable_most_optimizations', True)
