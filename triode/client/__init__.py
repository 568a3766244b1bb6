"""The client layer: a node's services over the wire, as typed Python objects.

``Client`` (``client``) holds one connection and one face per service: ``cas``, ``ac``,
``operations`` and ``tools``, and ``Client.execute``; ``actions`` uploads an action's
inputs and writes its outputs back. It imports only the wire and the shared model,
never a node's core.
"""

from .client import Client, client_config, connect, open_client

__all__ = ["Client", "client_config", "connect", "open_client"]
