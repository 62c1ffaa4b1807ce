"""`cts predict` on a 6000 x 6000 photo stays within 2 GiB of resident memory on the CPU
(it peaked at 3.2 GiB with the full-size float image and int64 labels, 6.2 GiB before the
upsampling stopped materialising full-resolution scores)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure" / "predict_memory.py"


def test_predict_6000px_jpeg_peaks_below_2_gib():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--side", "6000", "--limit-mib", "2048"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "within 2048" in result.stdout
