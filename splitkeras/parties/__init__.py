"""The parties of a split model: clients and the server."""

from splitkeras.parties.client import Client
from splitkeras.parties.server import Server

__all__ = ["Client", "Server"]
