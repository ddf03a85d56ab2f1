"""Bytes and addresses: NIXL agents, the side channel, and the messages both carry."""
