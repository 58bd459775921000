"""The cycle collector, set for a process that keeps many objects and makes many more.

With the interpreter's defaults (a young-generation pass every 700 net container
allocations) the collector took 8 % of the operator's CPU in a burst of 2,000
TokenRequests: each look allocates thousands of short-lived containers (JSON
documents, dicts, aiohttp's request objects), and every pass walks the young ones
again. Most of them are freed by reference counting before any pass; a pass every
10,000 allocations sees far fewer of them: the collector's CPU fell to under 1 %.
What only the collector frees (reference cycles: exceptions with tracebacks,
futures) waits a little longer, a few megabytes at most.

What exists when Kopf is started, the imported modules above all (Kopf, kubernetes,
aiohttp: most of the objects at start), lives as long as the process: frozen then,
full passes no longer walk it.
"""

from __future__ import annotations

import gc

# (young generation, middle, old): passes of each before the next is collected.
THRESHOLDS = (10_000, 10, 10)


def tune() -> None:
    """Fewer collector passes (before anything big is allocated)."""
    gc.set_threshold(*THRESHOLDS)


def freeze_startup() -> None:
    """Move what exists now (the process's long-lived start) out of the collector's walks.

    Called by the command, not by Kopf's startup handler: an operator run inside a test
    process must not freeze the tests' objects."""
    gc.collect()  # what is garbage already is not kept forever
    gc.freeze()
