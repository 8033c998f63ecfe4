"""Write the broker's boot definitions for a deployment: the topology (`definitions.json`'s
exchanges, queues, bindings, policies) in the deployment's vhost, plus an administrator, one
user per service and one per worker-host, each with only the permissions it needs
(`services.topology.permissions`, `topic_permissions`).

Passwords come from the environment and are written only as salted SHA-256 hashes, RabbitMQ's
own scheme, so the file holds no password in clear. The broker loads it at boot
(`load_definitions` in `rabbitmq.conf`); loading is additive: a user or permission removed here
stays on the broker until deleted there.

Environment: BROKER_VHOST [runner], BROKER_ADMIN_USER, BROKER_ADMIN_PASSWORD,
BROKER_PASSWORD_<SERVICE> for GATEWAY, ENTITLEMENT, SCHEDULER, MONITOR, BROKER_WORKER_HOSTS (the
hosts' ids, comma-separated) and BROKER_PASSWORD_WORKER_HOST_<HOST ID> for each (its id in
capitals, each character but a letter or a digit as `_`).

    python rabbitmq/render_definitions.py OUTPUT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from services.settings import variable_name
from services.topology import HOST_SERVICE, SERVICE_ACCESS, broker_users, definitions


def _required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"render_definitions: {name} is not set (see .env.example)")
    return value


def main(output: Path) -> None:
    vhost = os.environ.get("BROKER_VHOST") or "runner"
    admin = (_required("BROKER_ADMIN_USER"), _required("BROKER_ADMIN_PASSWORD"))
    passwords = {service: _required(variable_name("BROKER_PASSWORD_", service))
                 for service in SERVICE_ACCESS if service != HOST_SERVICE}
    hosts = {host: _required(variable_name("BROKER_PASSWORD_", f"{HOST_SERVICE}-{host}"))
             for host in filter(None, (h.strip() for h in
                                       os.environ.get("BROKER_WORKER_HOSTS", "").split(",")))}
    rendered = json.dumps(definitions(vhost, broker_users(admin, passwords, hosts)), indent=2)
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
