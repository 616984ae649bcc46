"""Build the tiny generation model examples/tiny-lm.yaml serves: a 2-layer GPT-2 with random
weights and a word-level tokenizer, written into examples/tiny-lm/ in a second, offline.

It says nothing that means anything (its weights are random): it is there to show the path
of a chat, streamed token by token, without downloading a model. Needs the hf extra
(pip install -e '.[hf]'). Usage: python examples/build_tiny_lm.py [FOLDER]
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.testing.tiny_models import build_tiny_causal_lm


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "tiny-lm"
    build_tiny_causal_lm(out)
    # A built model is not source: the folder keeps itself out of git.
    (out / ".gitignore").write_text("*\n")
    print(f"wrote a tiny GPT-2 to {out}")


if __name__ == "__main__":
    main()
