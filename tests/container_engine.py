"""Finding a container engine for the container tests, or skipping them saying why."""

from __future__ import annotations

import os

import pytest

from services.worker_host.worker_image import DEFAULT_IMAGE

CANDIDATES = ("unix:///run/podman/podman.sock", "unix:///var/run/docker.sock")


def engine_url() -> tuple[str | None, str]:
    """The first engine answering (RUNNER_CONTAINER_URL first) that holds the worker image, and
    why none does otherwise."""
    try:
        import docker
    except ImportError:
        return None, "the docker SDK is not installed"
    urls = [os.environ["RUNNER_CONTAINER_URL"]] if os.environ.get("RUNNER_CONTAINER_URL") \
        else list(CANDIDATES)
    why = f"no container engine answers at {', '.join(urls)} (.ci/run starts podman's)"
    for url in urls:
        try:
            client = docker.DockerClient(base_url=url, timeout=10)
            client.ping()
        except Exception:
            continue
        try:
            client.images.get(DEFAULT_IMAGE)
        except Exception:
            why = f"the engine at {url} has no {DEFAULT_IMAGE} (`runner images build`)"
            continue
        finally:
            client.close()
        return url, ""
    return None, why


def engine_or_skip() -> str:
    url, why = engine_url()
    if url is None:
        pytest.skip(why)
    return url
