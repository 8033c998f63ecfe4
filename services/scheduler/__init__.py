"""Scheduler service: the job queue, throttled placement on hosts, restarts, circuit breaker."""
