"""flax_adapters: adapter-based transfer learning for JAX/Flax."""
