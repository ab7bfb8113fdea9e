"""Fleets: devices learn their own tasks and sync only what each task owns, on Flower
(docs/fleet.md). :mod:`.sync` is the protocol (device side: no torch, no Flower);
:mod:`.apps` are the Flower ServerApp and ClientApp; :mod:`.launch` starts Flower's
processes (SuperLink, SuperNodes, ``flwr run``)."""

from .sync import FleetError, FleetStore, aggregate, apply_parts, inventory, offer

__all__ = ["FleetError", "FleetStore", "aggregate", "apply_parts", "inventory", "offer"]
