"""Browser-side files (JavaScript, CSS, the standalone page template) of
tc_explore's widgets and HTML exports, shipped as package data."""
from importlib import resources


def widget_asset(name: str) -> str:
    """Text of a browser-side file shipped in the ``tc_explore.widgets`` package."""
    try:
        return resources.files("tc_explore.widgets").joinpath(name).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise FileNotFoundError(
            f"Browser-side file {name!r} is missing from the tc_explore.widgets package; "
            "reinstall tc_explore (pip install -e .) so its package data is present.") from err
