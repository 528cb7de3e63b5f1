"""Shared runtime of every service: config, NATS plumbing, responders, health/metrics, logging, tracing."""

from .config import COMMON, REGISTRY, Setting, names_of
from .embedded import NatsCluster, NatsServer, free_port
from .follower import StreamFollower
from .natsio import ProvisioningError, StreamSettings, connect, provision
from .push_follower import PushFollower
from .responder import ServiceError, request, serve
from .service import Runtime, ServiceApp, main_for, run_app
from .workers import WorkerDirectory, WorkerWatcher, delete_worker, put_worker

__all__ = [
    "COMMON",
    "REGISTRY",
    "NatsCluster",
    "NatsServer",
    "ProvisioningError",
    "Runtime",
    "ServiceApp",
    "ServiceError",
    "Setting",
    "PushFollower",
    "StreamFollower",
    "StreamSettings",
    "WorkerDirectory",
    "WorkerWatcher",
    "connect",
    "delete_worker",
    "free_port",
    "main_for",
    "names_of",
    "provision",
    "put_worker",
    "request",
    "run_app",
    "serve",
]
