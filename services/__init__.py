"""KV-cache-aware router services: indexer, scheduler, epp_bridge and their tools."""
