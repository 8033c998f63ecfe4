"""Strategies installed only for tests: the directory above holds them and their `.dist-info`
(entry points in `runner.strategies`), so a worker started with it on PYTHONPATH finds them as
it finds any user's plugin."""
