"""The leaf every part of the product reads: the install root's layout, the sidecar's settings
file, the install receipt, the health probe, atomic file writes, a free port, and the error base
class. It imports nothing else of the project.
"""
