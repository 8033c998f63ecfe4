"""Gateway service: the HTTP API (FastAPI). Turns requests into commands on the bus and answers
from replies and projections over the bus; it reads no other service's database."""
