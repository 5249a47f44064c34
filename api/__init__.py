"""The HTTP API: x402 intake (`POST /api/x402-batch-mint`), payment status and queue statistics."""
