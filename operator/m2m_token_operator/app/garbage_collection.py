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
full passes no longer walk it. So does what the operator's start makes after that
(clients, sessions, watches, Kopf's own machinery, modules imported on first use):
some 70,000 objects, frozen again at the end of the start. Left in the young
generations, they were all walked by the first middle-generation pass, which fell
in the first second of a burst and stopped the event loop for 80-90 ms there.
"""

from __future__ import annotations

import gc

# (young generation, middle, old): passes of each before the next is collected.
THRESHOLDS = (10_000, 10, 10)


def tune() -> None:
    """Fewer collector passes (before anything big is allocated)."""
    gc.set_threshold(*THRESHOLDS)


_freezing = False  # the command froze the process's start: freeze the operator's too


def freeze_startup() -> None:
    """Move what exists now (the process's long-lived start) out of the collector's walks.

    Called by the command, not by Kopf's startup handler: an operator run inside a test
    process must not freeze the tests' objects."""
    global _freezing
    gc.collect()  # what is garbage already is not kept forever
    gc.freeze()
    _freezing = True


def freeze_started() -> None:
    """At the end of the operator's start: what it made lives as long as the process.

    Only where the command froze the process's start (`freeze_startup`): in a test
    process that runs the operator, nothing is frozen."""
    if _freezing:
        gc.collect()
        gc.freeze()
