-- Contract-wallet payers: an ERC-1271 signature is whatever the wallet checks (several owners' ECDSA
-- signatures, WebAuthn data, an ERC-6492 wrapper around either), not always an EOA's 65 bytes. The queue
-- takes 65 to 2048 bytes of lower-case hex; the intake enforces the same bounds
-- (payments.eip3009.MIN_SIGNATURE_BYTES / MAX_SIGNATURE_BYTES), the x402 verifier checks the signature
-- itself (ECDSA for an address without code, ERC-1271 by eth_call for one with code).
-- PostgreSQL regex bounds stop at 255, so the length is checked apart from the pattern.
ALTER TABLE payment_queue DROP CONSTRAINT payment_queue_signature_check;
ALTER TABLE payment_queue ADD CONSTRAINT payment_queue_signature_check
    CHECK (signature ~ '^0x([0-9a-f]{2})+$' AND length(signature) BETWEEN 2 + 2 * 65 AND 2 + 2 * 2048);
