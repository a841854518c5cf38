"""High availability: storage-heartbeat self-fencing and network-group monitoring."""
