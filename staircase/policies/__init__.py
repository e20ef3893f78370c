"""Policies: the protocol (``base``), the fixed kinds (``fixed``), the adaptive kinds
(``adaptive``), and the registry that names them all (``registry``, re-exported here:
``from staircase.policies import StaircasePolicy, make_policies``)."""

from .registry import *  # noqa: F401,F403
from .registry import __all__  # noqa: F401
