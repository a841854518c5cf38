"""The framework: HTTP server, command registry and dispatch, async tasks and callback delivery,
MN reports, persistent state, locks, bounded blocking work, config, metrics, logging, and thin
adapters around outside systems (libvirt connection, mount table). It knows no capability.
"""
