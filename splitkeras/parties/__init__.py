"""The parties of a split model: clients, the server, and relays."""

from splitkeras.parties.client import Client
from splitkeras.parties.relay import Relay
from splitkeras.parties.server import Server

__all__ = ["Client", "Relay", "Server"]
