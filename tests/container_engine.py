"""Finding a container engine for the container tests, or skipping them saying why."""

from __future__ import annotations

import functools
import os

import pytest

from services.worker_host.worker_image import DEFAULT_IMAGE, build

CANDIDATES = ("unix:///run/podman/podman.sock", "unix:///var/run/docker.sock")


@functools.cache
def engine_url() -> tuple[str | None, str]:
    """The first engine answering (RUNNER_CONTAINER_URL first), with the worker image built
    from the files here (`runner images build`: skipped when it is), and why none is
    otherwise."""
    try:
        import docker
    except ImportError:
        return None, "the docker SDK is not installed"
    urls = [os.environ["RUNNER_CONTAINER_URL"]] if os.environ.get("RUNNER_CONTAINER_URL") \
        else list(CANDIDATES)
    why = f"no container engine answers at {', '.join(urls)} (.ci/run starts podman's)"
    for url in urls:
        try:
            client = docker.DockerClient(base_url=url, timeout=300)  # a build: ~20 s
            client.ping()
        except Exception:
            continue
        try:
            build(client, DEFAULT_IMAGE)
        except Exception as exc:
            pytest.fail(f"the worker image could not be built in the engine at {url}: {exc}")
        finally:
            client.close()
        return url, ""
    return None, why


def engine_or_skip() -> str:
    url, why = engine_url()
    if url is None:
        pytest.skip(why)
    return url
