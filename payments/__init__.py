"""Asynchronous x402 payment settlement: queue in PostgreSQL, settle on chain, confirm, then mint."""
