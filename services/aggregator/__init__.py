"""Aggregator: parameter-server shards, and the coordinator that accepts and finishes jobs."""
