"""One exception root with specific leaves."""

from __future__ import annotations


class PaymentsError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigurationError(PaymentsError):
    """A setting or environment variable is missing or invalid."""


class InvalidPaymentError(PaymentsError):
    """A payment was rejected before anything was written. `reason` is stable and machine-readable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class InsufficientFundsError(InvalidPaymentError):
    """The payer's open payments plus this one are more than its balance covers (or than it may have open)."""

    def __init__(self, message: str) -> None:
        super().__init__("insufficient_funds", message)


class DuplicatePaymentError(PaymentsError):
    """The same authorization was submitted before with a different body."""

    def __init__(self, existing_id: str) -> None:
        super().__init__(f"authorization already queued as payment {existing_id} with different content")
        self.existing_id = existing_id


class RpcError(PaymentsError):
    """The RPC endpoint could not be reached or answered with a transport-level failure."""
