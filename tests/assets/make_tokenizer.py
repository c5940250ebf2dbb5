"""Regenerates tests/assets/tokenizer: the project's tokenizer trained on tiny_pairs.jsonl, 1500 tokens.

Run only when a change is *meant* to alter it (golden losses and other fixed numbers of the suite
follow; regenerate tests/assets/golden_losses.json after it with make_golden_losses.py):
    .venv/bin/python tests/assets/make_tokenizer.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ds_train.data.tokenizer import train_tokenizer

ASSETS = Path(__file__).resolve().parent
tokenizer = train_tokenizer(ASSETS / "tiny_pairs.jsonl", ASSETS / "tokenizer", vocab_size=1500)
print(f"wrote {ASSETS / 'tokenizer'}: {len(tokenizer)} tokens")
