"""`runner images`: the container workers' images (RUNNER_SPAWN_MODE=container,
docs/CONTAINERS.md). `build` makes the worker image from this machine's own Python, offline."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from services.cli.errors import fail
from services.settings import Settings

images_app = typer.Typer(no_args_is_help=True, help="Container workers' images.")
console = Console()


def _client(settings: Settings) -> Any:
    from services.worker_host.container_spawner import engine_client, engine_problem

    try:
        client = engine_client(settings.container_url)
        client.ping()
    except Exception as exc:
        fail(engine_problem(settings, exc))
    return client


@images_app.command("build")
def build_command(
    tag: str = typer.Option("", help="the image's name [RUNNER_CONTAINER_IMAGE]"),
    force: bool = typer.Option(False, "--force", help="build even if it is up to date"),
) -> None:
    """Build the worker image locally (no registry): this machine's Python, the project and its
    run-time dependencies, FROM scratch."""
    from services.worker_host.worker_image import build

    settings = Settings()
    tag = tag or settings.container_image
    client = _client(settings)
    console.print(f"building {tag} in the engine at {settings.container_url or 'DOCKER_HOST'}…")
    try:
        image_id, built = build(client, tag, force=force)
    except Exception as exc:
        fail(f"the image could not be built: {exc}")
    finally:
        client.close()
    console.print(f"{tag} {'built' if built else 'is up to date'}: {image_id[:19]}", soft_wrap=True)


@images_app.command("list")
def list_command() -> None:
    """The images strategies may run in (the default first) and whether the engine has them."""
    settings = Settings()
    client = _client(settings)
    try:
        for name in (settings.container_image, *settings.container_images):
            try:
                image = client.images.get(name)
                console.print(f"{name}  {image.short_id}")
            except Exception:
                console.print(f"{name}  (not in the engine)")
    finally:
        client.close()
