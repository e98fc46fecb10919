"""The self-contained demo: reference inference server, simulated users, trainer.

``atlas-sidecar demo`` runs it (:func:`run_demo`). The parts are real
processes: ``python -m sidecar.demo.server``, ``python -m
sidecar.demo.population`` and ``python -m sidecar.demo.trainer``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.demo._run import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]


def __getattr__(name: str) -> Any:
    # Lazy: the trainer, server and users import this package on every start
    # and need none of the orchestration (or its imports).
    if name in __all__:
        from sidecar.demo import _run

        return getattr(_run, name)
    raise AttributeError(f"module 'sidecar.demo' has no attribute {name!r}")
