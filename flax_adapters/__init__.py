"""flax_adapters: adapter-based transfer learning for JAX/Flax (package root; the adapter core fills this in)."""
