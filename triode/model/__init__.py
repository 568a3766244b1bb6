"""The shared model: digests, actions and their results, as typed values.

Every layer speaks these: the core parts, the node, the client and the CLI. They hold
data and validate it; they do no I/O.
"""
