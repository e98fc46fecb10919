"""Helpers for tests of code that uses the sidecar: a real daemon in a subprocess."""

from sidecar.testing._control import FakeControlPlane, SentProbe
from sidecar.testing._daemon import DaemonProcess, free_port

__all__ = ["DaemonProcess", "FakeControlPlane", "SentProbe", "free_port"]
