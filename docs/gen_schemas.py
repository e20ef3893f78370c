"""Writes docs/reference/schemas.md and docs/reference/schemas/*.json: the JSON Schemas of
the files a user writes (policy configs, engine configs, deployments, latency profiles),
each from the function next to its loader.

    python docs/gen_schemas.py          # rewrite the page and the files
    python docs/gen_schemas.py --check  # exit 1 if any is stale (tests/test_docs.py runs this check)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "schemas.md"
FILES = ROOT / "docs" / "reference" / "schemas"

INTRO = """# File schemas

The JSON Schemas (draft 2020-12) of the files you write, generated from the function
beside each loader by `python docs/gen_schemas.py` (`make test` fails when this page is
stale). The files are also in `docs/reference/schemas/`: point an editor at one for
completion and checks as you type. Each loader checks more than its schema says (the
notes under each); whatever it refuses, it refuses with one line naming the field, the
value and what is allowed. `tests/test_fuzz.py` holds both to that: instances drawn from
each schema load, and an instance with one value the schema refuses fails naming it.
"""


def schemas() -> dict[str, tuple[str, str, dict]]:
    """file stem -> (title, where it is used and what is checked beyond it, schema)."""
    from staircase.live.engines.config import json_schema as engines
    from staircase.sim.profile import json_schema as profile
    from staircase.deployment import json_schema as deployment
    from staircase.policies import json_schema as policy

    def doc(fn) -> str:
        return " ".join(fn.__doc__.split())
    return {"policy": ("Policy config", doc(policy), policy()),
            "engines": ("Engines and slots", "`--config` of live, serve, calibrate and quality. " + doc(engines),
                        engines()),
            "deployment": ("Deployment", "`--deployment` of sim, search, plan, live, serve and calibrate (JSON or "
                           "YAML). " + doc(deployment), deployment()),
            "profile": ("Latency profile", "`--profile` of sim, search and plan; what `staircase calibrate` "
                        "writes. " + doc(profile), profile())}


def render() -> dict[Path, str]:
    """Every generated file and its text."""
    page, out = [INTRO], {}
    for stem, (title, note, schema) in schemas().items():
        text = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
        out[FILES / f"{stem}.json"] = text
        page += [f"## {title}\n", f"{note}\n", f"File: `docs/reference/schemas/{stem}.json`\n",
                 f"```json\n{text}```\n"]
    out[PAGE] = "\n".join(page)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale")
    args = p.parse_args(argv)
    files = render()
    stale = [str(path.relative_to(ROOT)) for path, text in files.items()
             if not path.is_file() or path.read_text() != text]
    if args.check:
        print("stale: " + ", ".join(stale) if stale else "current")
        return 1 if stale else 0
    FILES.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
