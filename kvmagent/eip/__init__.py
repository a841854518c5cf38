"""Flat-network elastic IPs: naming, validation, netlink (pyroute2), nftables, manager.

See :mod:`kvmagent.eip.manager` for ordering, records and rollback, :mod:`.netlink` for the
namespace layout and :mod:`.nft` for the ruleset. The plugin is ``plugins/eip.py``.
"""
