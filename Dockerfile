# The project image: every service runs from it as `runner service NAME` (see docker-compose.yml).
# The base pinned to a release, the dependencies to constraints.txt (`make lock`).
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY events ./events
COPY projections ./projections
COPY services ./services
COPY runner_client ./runner_client
RUN pip install -c constraints.txt ".[postgres]"
# render_definitions.py writes the broker's boot definitions (users, permissions) from the topology
COPY rabbitmq ./rabbitmq

# /data: a service's own store, admin token and keys; /broker: rendered broker definitions.
# Created here so that a fresh named volume mounted on them belongs to the runner user.
RUN useradd --create-home --uid 10001 runner \
    && mkdir -p /data /broker \
    && chown runner:runner /data /broker
USER runner
ENV RUNNER_DATA_DIR=/data \
    RUNNER_HTTP_HOST=0.0.0.0 \
    RUNNER_HTTP_PORT=8080
EXPOSE 8080 9100

ENTRYPOINT ["runner"]
CMD ["--help"]
