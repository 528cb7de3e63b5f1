"""`kvr provision`: create or check every stream, KV bucket and object store of kvr, then exit.

With least-privilege NATS users (docs/security.md) the services cannot create streams; this one-shot
command runs with the provisioner identity (a Kubernetes Job, or once by hand) and the services run
with `KVR_PROVISION=false` or simply find everything in place. Same configuration as the services
(stream names, ages, replicas), so they agree on every stream they check.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence

from services.relay.settings import RelayConfig
from services.runtime.config import REGISTRY, ServiceConfig, config, names_of, resolve, same_as, setting
from services.runtime.logs import get_logger, setup_logging
from services.runtime.natsauth import NatsAuth
from services.runtime.natsio import ProvisioningError, connect, ensure_workers_bucket, provision
from services.runtime.service import build_parser, stream_settings


@config
class ProvisionConfig(ServiceConfig):
    relay_bucket: str = same_as(RelayConfig, "relay_bucket")
    provision_wait_s: float = setting(120.0, "kvr provision: how long to wait for the NATS server")


SETTINGS = REGISTRY.register("provision", ProvisionConfig.own_settings())
REGISTRY.command("provision", ProvisionConfig.settings())

log = get_logger("kvr.provision")


async def run(cfg: ProvisionConfig) -> dict[str, str]:
    nc = await connect(cfg.nats_url, "kvr-provision", auth=NatsAuth.from_cfg(cfg), max_wait_s=cfg.provision_wait_s)
    try:
        js = nc.jetstream()
        result = await provision(js, names_of(cfg), stream_settings(cfg))
        result[cfg.relay_bucket] = await ensure_workers_bucket(js, cfg.relay_bucket, cfg.stream_replicas)
        return result
    finally:
        await nc.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("kvr provision", (__doc__ or "").splitlines()[0], ProvisionConfig.settings())
    cfg = resolve(parser.parse_args(argv), ProvisionConfig)
    setup_logging(cfg.log_format, cfg.log_level, service="provision")
    try:
        result = asyncio.run(run(cfg))
    except (ProvisioningError, ConnectionError) as exc:
        log.error("provision.failed", error=str(exc))
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
