"""Failpoints for crash drills: with PAYMENTS_FAILPOINT=<name> set, the process kills itself with
SIGKILL when it reaches that point - a real kill -9 at an exact place in the pipeline. Unset (always
in production), a failpoint is one dictionary lookup."""

from __future__ import annotations

import os
import signal

AFTER_PERSIST = "send.after_persist"  # nonce, raw tx and hash committed; nothing broadcast
AFTER_BROADCAST = "send.after_broadcast"  # broadcast accepted; `sent` not yet written


def failpoint(name: str) -> None:
    if os.environ.get("PAYMENTS_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
