"""Write the broker's boot definitions for a deployment: the topology (`definitions.json`'s
exchanges, queues, bindings, policies) in the deployment's vhost, plus an administrator and one
user per service with only the permissions that service needs (`services.topology.permissions`).

Passwords come from the environment and are written only as salted SHA-256 hashes, RabbitMQ's
own scheme, so the file holds no password in clear. The broker loads it at boot
(`load_definitions` in `rabbitmq.conf`); loading is additive: a user or permission removed here
stays on the broker until deleted there.

Environment: BROKER_VHOST [runner], BROKER_ADMIN_USER, BROKER_ADMIN_PASSWORD, and
BROKER_PASSWORD_<SERVICE> for GATEWAY, ENTITLEMENT, SCHEDULER, WORKER_HOST, MONITOR.

    python rabbitmq/render_definitions.py OUTPUT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from services.topology import SERVICE_ACCESS, broker_users, definitions


def _required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"render_definitions: {name} is not set (see .env.example)")
    return value


def main(output: Path) -> None:
    vhost = os.environ.get("BROKER_VHOST") or "runner"
    admin = (_required("BROKER_ADMIN_USER"), _required("BROKER_ADMIN_PASSWORD"))
    passwords = {
        service: _required(f"BROKER_PASSWORD_{service.upper().replace('-', '_')}")
        for service in SERVICE_ACCESS
    }
    rendered = json.dumps(definitions(vhost, broker_users(admin, passwords)), indent=2)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_suffix(".partial")
    partial.write_text(rendered + "\n")
    partial.chmod(0o644)  # read by the broker's own user in its container
    partial.replace(output)
    print(
        f"wrote {output}: vhost {vhost!r}, users {admin[0]} and "
        f"{', '.join(u['name'] for u in json.loads(rendered)['users'][1:])}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
