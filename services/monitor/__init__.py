"""The monitor service: event-log recorder, live projections, heartbeat watchdog, status queries."""
