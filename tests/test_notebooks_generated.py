"""The committed notebooks are exactly what notebooks/make_notebooks.py writes
(cell ids included: they are derived from the cells, not random)."""
import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "notebooks" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()


@pytest.mark.parametrize("name", sorted(GENERATOR.NOTEBOOKS))
def test_committed_notebook_equals_the_generators_output(name):
    committed = (ROOT / "notebooks" / name).read_text(encoding="utf-8")
    assert committed == nbformat.writes(GENERATOR.build(name)) + "\n", (
        f"notebooks/{name} differs from what notebooks/make_notebooks.py writes: edit the generator "
        "and run `python notebooks/make_notebooks.py`.")


def test_cell_ids_are_deterministic_and_unique():
    first, second = GENERATOR.build("walkthrough.ipynb"), GENERATOR.build("walkthrough.ipynb")
    ids = [c.id for c in first.cells]
    assert ids == [c.id for c in second.cells]
    assert len(set(ids)) == len(ids)
    seen = set()
    twin = nbformat.v4.new_markdown_cell("same")
    assert GENERATOR.cell_id(twin, seen) != GENERATOR.cell_id(twin, seen)
