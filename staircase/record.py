"""The run record: every command's ``config.json``, one shape, written and read here.

A record is a JSON object with ``schema`` (``staircase-run/1``), ``command`` (sim, live,
serve, calibrate, quality), ``created_utc``, ``staircase_version``, then, where the run
has them, ``topology`` (its description), ``topology_config`` and ``policies`` (the
configs themselves, so any tool can rebuild and replay a run whoever recorded it), and
the command's own fields. ``write_record`` writes it atomically (a reader never sees
half a file: a server rewrites it as it runs); ``read_record`` reads one back with a
field-named error; ``topology_and_policies`` rebuilds what a run ran, also for runs
recorded before the configs were (their ``cli_args``) and before the record had a
``schema``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

from .errors import ConfigError
from .jsonio import read_json

SCHEMA = "staircase-run/1"
COMMANDS = ("sim", "live", "serve", "calibrate", "quality")
FILE = "config.json"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("staircase")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def run_record(command: str, topology=None, policies: Iterable = (), **fields) -> dict:
    """A new record of ``command``: the common head, the topology and policies when
    given (a ``Topology``, ``Policy`` objects), then ``fields`` in the order given."""
    if command not in COMMANDS:
        raise ConfigError("record.command", command, ", ".join(COMMANDS))
    out = {"schema": SCHEMA, "command": command, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "staircase_version": _version()}
    if topology is not None:
        out |= {"topology": topology.describe(), "topology_config": topology.config()}
    policies = list(policies)
    if policies:
        out["policies"] = [p.describe() for p in policies]
    return out | fields


def write_record(folder: Path | str, record: Mapping) -> Path:
    """``<folder>/config.json``, written whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / FILE, folder / (FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def read_record(folder: Path | str, field: str = "run", commands: Iterable[str] = COMMANDS) -> dict:
    """A results folder's record; ``commands``: the commands whose folders are allowed."""
    folder, commands = Path(folder), tuple(commands)
    what = " or ".join(f"`staircase {c}`" for c in commands)
    if not (folder / FILE).is_file():
        raise ConfigError(field, str(folder), f"a results folder of {what} (with {FILE})")
    record = read_json(folder / FILE, field)
    if not isinstance(record, dict) or record.get("command") not in commands:
        got = record.get("command") if isinstance(record, dict) else record
        raise ConfigError(f"{folder / FILE}.command", got, " or ".join(commands) + f" (a results folder of {what})")
    return record


def topology_and_policies(record: Mapping):
    """The topology and policies a run recorded: its ``topology_config`` and
    ``policies`` configs; runs recorded before topology configs are rebuilt from their
    ``cli_args`` (the options as plain values)."""
    from .policies import policy_from_dict
    from .runconfig import topology_and_policies_from_values
    from .topology import topology_from_config

    if "topology_config" in record and record.get("policies"):
        topology = topology_from_config(record["topology_config"])
        policies = [policy_from_dict(d) for d in record["policies"]]
    elif "cli_args" in record:
        topology, policies = topology_and_policies_from_values(record["cli_args"])
    else:
        raise ConfigError("record.topology_config", None, "the recorded topology and policies")
    for policy in policies:
        policy.validate_for(topology)
    return topology, policies
