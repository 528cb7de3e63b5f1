"""Fault-injection harness shared by `bench/faults.py` (long runs) and `tests/faults/` (short runs).

Everything runs as real processes on loopback: nats-server (one, or a 3-node cluster with R3
streams), `kvr indexer` ×2, `kvr scheduler` ×2 (each with its own index replica), `kvr epp-bridge`,
`kvr mock-workers`. This process plays the gateway (epp.query → generate on the chosen worker →
epp.cleanup) and a probe publisher whose every JetStream ack is remembered.

- `stack`: starting, killing and restarting the processes; RSS, readiness and `/digest` of each.
- `load`: the gateway load and the probe publisher (what JetStream accepted, ack by ack).
- `audit`: what the KV stream holds against what was acknowledged; replicas against a fresh replica
  that replays the whole stream (the witness); bookings left after the cleanup window.
- `scenarios`: the faults (SIGKILL indexer / scheduler, kill -9 nats-server, stream leader of a
  3-node cluster) as one function each, returning the figures both callers print.
"""
