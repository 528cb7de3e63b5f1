"""EPP bridge: answers the gateway endpoint picker's epp.query / epp.cleanup over NATS (PROTOCOL.md §5)."""
