"""The README's Python API example, run as written on a real cluster and real data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.cluster


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the README should hold exactly one Python example"
    return blocks[0]


def test_readme_example_runs(tmp_path, data_dir):
    code = readme_example()
    code = code.replace('"../shared/data"', repr(str(data_dir)))
    code = code.replace('output_dir="runs"', f"output_dir={str(tmp_path)!r}")
    # Compare the in-process model with the distributed evaluation of the same run.
    code += (
        "\nimport json\n"
        "print('RESULT', json.dumps({'distributed': history['test_accuracy'], "
        "'in_process': accuracy, 'without_arm_0': accuracy_without_arm_0, "
        "'reloaded': same_model.evaluate(images, labels), "
        "'predictions': len(predictions), 'epochs': len(history['epochs']), "
        "'brain_mode': model.config.brain_mode}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    values = json.loads(line.removeprefix("RESULT "))

    assert values["brain_mode"] == "logit"
    assert values["epochs"] == 1
    assert values["predictions"] == 500
    # Chance is 0.10 on 500 images (std 0.013); 2,000 training images for one
    # epoch give about 0.2.
    assert values["in_process"] > 0.15
    assert values["in_process"] == pytest.approx(values["distributed"], abs=0.005)
    assert values["reloaded"] == values["in_process"]
    assert values["without_arm_0"] > 0.15
