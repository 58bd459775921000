"""The running operator: Kopf wiring (handlers), startup resources, the console script.

The top layer: it may import every other layer, and nothing imports it.
"""
