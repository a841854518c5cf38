"""kvmagent: an asyncio KVM host agent."""

__version__ = "0.1.0"
