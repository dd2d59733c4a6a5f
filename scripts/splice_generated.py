"""Replace each generated block of a markdown file with the current content of the file it names:

    python scripts/splice_generated.py experiments/preflight.md      # (make preflight-calibration runs it)

A block is the text between a line `<!-- generated from PATH -->` (PATH relative to the markdown file)
and the next `<!-- end generated -->`; everything outside the blocks is left as written. The file is
rewritten atomically; a named file that does not exist is an error (exit 2), and nothing is written.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from opd_cli.io import atomic_write_text

BLOCK = re.compile(r"(<!-- generated from (\S+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def splice(doc: Path) -> str:
    def fill(m: re.Match) -> str:
        source = doc.parent / m.group(2)
        if not source.is_file():
            print(f"error: {doc}: {m.group(2)} does not exist; generate it first", file=sys.stderr)
            sys.exit(2)
        return m.group(1) + source.read_text().rstrip("\n") + "\n" + m.group(4)

    return BLOCK.sub(fill, doc.read_text())


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        print(
            "usage: python scripts/splice_generated.py FILE.md (an existing markdown file)", file=sys.stderr
        )
        sys.exit(2)
    doc = Path(sys.argv[1])
    atomic_write_text(doc, splice(doc))


if __name__ == "__main__":
    main()
