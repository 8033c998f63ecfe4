"""The five services of the Runner Orchestrator, the worker runtime they spawn, and the bus,
store and settings they share as code (never as state)."""
