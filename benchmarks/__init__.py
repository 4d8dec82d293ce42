"""Side-by-side speed and memory benchmarks: flax_adapters against HF PEFT (scripts, not tests)."""
