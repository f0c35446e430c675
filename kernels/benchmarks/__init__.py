"""Benchmarks of the sparse kernels: `python -m kernels.benchmarks.bench_train_step` and
`python -m kernels.benchmarks.bench_memory` (add --quick for a smoke run). They print
tables and never assert on timings; the same scripts run on CPU and on CUDA."""
