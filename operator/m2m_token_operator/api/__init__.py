"""The TokenRequest contract: group, kind, labels, annotations, reasons, spec parsing, names.

Only what the cluster and the user see: pure values and parsing, importing nothing of ours
from the other layers. Everything else in the operator may import from here.
"""
