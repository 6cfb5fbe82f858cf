"""Collectives, the sharding plan and the Lightning strategies: how one model runs over many ranks."""
