"""Status values. The same sets live in the CHECK constraints of sql/migrations; a test compares them."""

from __future__ import annotations

from enum import StrEnum


class PaymentStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    SENT = "sent"
    COMPLETED = "completed"
    FAILED = "failed"
    CONFIRMATION_FAILED = "confirmation_failed"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def is_failure(self) -> bool:
        """What a polling client treats as failure (the seed's `failed || confirmation_failed`)."""
        return self in (PaymentStatus.FAILED, PaymentStatus.CONFIRMATION_FAILED)


TERMINAL_STATUSES = frozenset(
    {PaymentStatus.COMPLETED, PaymentStatus.FAILED, PaymentStatus.CONFIRMATION_FAILED}
)


class MintStatus(StrEnum):
    WAITING = "waiting"
    RELEASED = "released"
    MINTING = "minting"
    MINTED = "minted"
    CANCELLED = "cancelled"
    FAILED = "failed"


class TxKind(StrEnum):
    SETTLEMENT = "settlement"
    REPLACEMENT = "replacement"
    CANCEL = "cancel"
    GAP_FILL = "gap_fill"
    MINT = "mint"
