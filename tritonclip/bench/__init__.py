"""Benchmarks of tritonclip against torch.nn.utils: ``python -m tritonclip.bench --help``."""
