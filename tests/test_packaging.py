"""setup.cfg lists every package of ours: an editable install finds any
subpackage, so a package missing from the list would only break a real
``pip install`` (a wheel without it)."""
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_subpackage():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {".".join(init.parent.relative_to(ROOT).parts)
               for init in (ROOT / "tc_explore").rglob("__init__.py")}
    missing = sorted(on_disk - listed)
    assert not missing, f"setup.cfg [options] packages is missing {missing}"
