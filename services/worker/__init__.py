"""The worker runtime: one strategy on one broker account, run as its own OS process.

`python -m services.worker` (or `runtime.run_worker(env)`) speaks `protocol.py` to the
worker-host that spawned it. Kept free of the bus and the database so hundreds start cheaply.
"""
