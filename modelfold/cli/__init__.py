"""The ``modelfold`` command: ``commands`` runs fold / prune / compress / inspect, ``parser`` and
``options`` define the arguments, ``eval`` is ``modelfold eval``. ``python -m modelfold.cli`` runs it."""

from .commands import main

__all__ = ["main"]
