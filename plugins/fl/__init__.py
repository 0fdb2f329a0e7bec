"""Federated learning on Flower's Deployment Engine (SuperLink + SuperNodes over gRPC).

Example::

    from fedge.plugins.fl import FlConfig, run

    result = run(FlConfig(clients=4, rounds=5))
    private = run(FlConfig(clients=4, rounds=5, privacy=PrivacyConfig(dp="central", target_epsilon=8.0)))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedge.plugins.fl.config import FlConfig, load_config
from fedge.plugins.fl.privacy import PrivacyConfig

if TYPE_CHECKING:
    from fedge.plugins.fl.runner import RunResult, run

__all__ = ["FlConfig", "PrivacyConfig", "RunResult", "load_config", "run"]


def __getattr__(name: str) -> Any:
    # The runner imports Flower and torch; `fedge fl --help` and the config alone must not.
    if name in ("RunResult", "run"):
        from fedge.plugins.fl import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
