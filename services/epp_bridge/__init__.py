"""EPP bridge: answers the gateway endpoint picker's epp.query / epp.cleanup over NATS (docs/protocol.md §5)."""
