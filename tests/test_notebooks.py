"""notebooks/*.ipynb: stored without outputs, and executed end to end (nbclient, a real Jupyter
kernel) with the bundled model, from a scratch working directory, as a user runs them."""

import json
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "notebooks")
NAMES = ("quickstart.ipynb", "finetuning.ipynb")


def read(name):
    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs_and_valid(name):
    nb = read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert nb.metadata["kernelspec"]["name"] == "python3"
    # the install cell installs only where sam_jax is missing (a fresh Colab runtime)
    assert 'find_spec("sam_jax") is None' in code[0].source


def execute(name, cwd):
    nb = read(name)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def text_of(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif "data" in o and "text/plain" in o.data:
                out.append(o.data["text/plain"])
    return "\n".join(out)


def pictures(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_quickstart_runs(tmp_path):
    nb = execute("quickstart.ipynb", tmp_path)
    text = text_of(nb)
    assert "SamModel(dinov2_s" in text  # the bundled model's short repr
    inside = re.search(r"(\d+)% of the mask lies inside the box", text)
    assert inside and int(inside.group(1)) >= 90, text
    assert "(4, 1, 1200, 1800)" in text  # predict_batch: 4 boxes
    found = re.search(r"(\d+) masks in", text)
    assert found and int(found.group(1)) >= 1, text
    assert pictures(nb) == 5  # 3 candidates (one figure), 2 points, box, batch, automatic


def test_finetuning_runs(tmp_path):
    nb = execute("finetuning.ipynb", tmp_path)
    text = text_of(nb)
    assert "2 held-out images" in text
    rows = re.findall(r"(miou_\d|oracle_1)\s+before (\d\.\d+)\s+after (\d\.\d+)", text)
    assert [r[0] for r in rows] == ["miou_1", "miou_2", "miou_3", "oracle_1"], text
    for _, before, after in rows:
        assert 0.5 < float(before) <= 1 and 0.5 < float(after) <= 1
    run = tmp_path / "finetune_run"
    assert (run / "final" / "config.json").exists()
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")
             if json.loads(line)["kind"] == "train"]
    assert steps[-1] == 4
    assert pictures(nb) == 2  # the loss curve and the fine-tuned model's mask
