"""Fixtures shared by the integration tests."""

from tests.integration.worker_processes import spawn

__all__ = ["spawn"]
