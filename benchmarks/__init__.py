"""DenseRC speed and memory benchmarks: runnable programs (``python -m benchmarks.<name>``), not tests."""
