"""One process of a heal launched by :func:`layerprune.healing.heal` with ``processes`` > 1 (under torchrun):
``python -m layerprune.healing.launch SPEC.json``, the spec holding heal's arguments. A refusal is one line
(``layerprune: ...``) that the launching process repeats."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from ..errors import LayerpruneError
    from . import heal

    spec = json.loads(Path(argv[0]).read_text())
    try:
        heal(spec["model_dir"], spec["out_dir"], **spec["options"])
    except LayerpruneError as e:
        print(f"layerprune: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
