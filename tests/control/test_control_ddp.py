import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.ddp
@pytest.mark.slow
def test_http_patch_changes_next_epoch_budget_on_both_ranks(tmp_path):
    script = Path(__file__).parent / "ddp_control_script.py"
    subprocess.run([sys.executable, str(script), str(tmp_path), "2", "ddp"], check=True, timeout=600)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # Bad value -> 422, no token -> 401, bad JSON -> 422, valid -> 202 (applied at the next epoch boundary).
    assert rank0["answers"] == [422, 401, 422, 202]
    # Epoch 0 made 200 (100 per rank); from epoch 1 on, every rank uses the patched budget of 40.
    assert rank0["budgets"] == rank1["budgets"] == [100, 20, 20]
    assert rank0["settings_budget"] == rank1["settings_budget"] == 40
    assert rank0["pool"] == rank1["pool"] == 280
