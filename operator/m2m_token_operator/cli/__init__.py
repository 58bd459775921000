"""`kubectl m2m`: the day-two command-line plugin.

A top layer beside `app`: it may import the lower layers, and nothing imports it.
"""
