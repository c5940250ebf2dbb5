"""Regenerates golden_losses.json: the per-step losses of the seeded short run in test_train.py.

Run only when a change is *meant* to alter the numbers (say why in the commit):
    DS_ACCELERATOR=cpu .venv/bin/python tests/assets/make_golden_losses.py
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ds_train.train import main
from tests.test_train import GOLDEN, losses, overrides

with tempfile.TemporaryDirectory() as tmp:
    run = Path(tmp) / "run"
    assert main(overrides(run, train__max_steps=6)) == 0
    got = losses(run)
    GOLDEN.write_text(json.dumps({"train/loss": [got[s] for s in range(1, 7)]}, indent=1) + "\n")
    print(GOLDEN.read_text())
