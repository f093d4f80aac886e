"""Write the JSON Schema of the result file (``cpp.result.ClusterResult``) to docs/result.schema.json.

python scripts/export_schema.py            # regenerate
python scripts/export_schema.py --check    # exit 1 when the committed file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cpp.result import json_schema

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "result.schema.json"


def render() -> str:
    """The schema as committed: indented JSON with a trailing newline."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(SCHEMA_PATH))
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    out = Path(args.out)
    text = render()
    if args.check:
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            print(f"{out} is out of date: run python scripts/export_schema.py", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
