#!/usr/bin/env python3
"""Rewrite the README's generated tables (settings, metrics) from the code.

    .venv/bin/python scripts/regen_docs.py

``tests/unit/test_settings_doc.py`` fails while the README and the code differ.
"""

import re
from pathlib import Path

from stream_worker.metrics import metrics_table
from stream_worker.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
TABLES = {"settings-table": settings_table, "metrics-table": metrics_table}


def main() -> None:
    text = README.read_text()
    for name, generate in TABLES.items():
        pattern = rf"(<!-- {name}:[^\n]*-->\n)(.*?)(\n<!-- {name}: end -->)"
        text, found = re.subn(pattern, lambda m, g=generate: m.group(1) + g() + m.group(3),
                              text, flags=re.S)  # fmt: skip
        if not found:
            raise SystemExit(f"README.md has no {name} markers")
    README.write_text(text)


if __name__ == "__main__":
    main()
