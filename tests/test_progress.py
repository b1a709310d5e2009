"""Progress bars: on by default, off where CI is set, overridable."""
import io

from tc_explore.progress import progress_bar, progress_enabled


def test_default_is_on_and_ci_turns_it_off(monkeypatch):
    monkeypatch.delenv("TC_EXPLORE_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert progress_enabled() is True
    for value in ("true", "1", "yes"):
        monkeypatch.setenv("CI", value)
        assert progress_enabled() is False
    monkeypatch.setenv("CI", "false")
    assert progress_enabled() is True
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("TC_EXPLORE_PROGRESS", "1")
    assert progress_enabled() is True
    assert progress_enabled(False) is False


def test_bar_draws_when_on_and_is_silent_when_off(monkeypatch):
    out = io.StringIO()
    assert list(progress_bar(range(3), desc="work", progress=True, file=out)) == [0, 1, 2]
    assert "work" in out.getvalue() and "3/3" in out.getvalue()
    bar = progress_bar(total=5, desc="quiet", progress=False)
    bar.update(2)
    bar.set_postfix(loss=1.0)
    bar.close()
    assert list(progress_bar(range(2), progress=False)) == [0, 1]


def test_a_junk_environment_value_is_refused_not_taken_for_on(monkeypatch):
    from tc_explore.errors import InvalidInputError
    from tc_explore.testing import assert_our_error
    monkeypatch.setenv("TC_EXPLORE_PROGRESS", "maybe")
    error = assert_our_error(progress_enabled, InvalidInputError, "TC_EXPLORE_PROGRESS='maybe'")
    assert "1" in str(error) and "off" in str(error)
    assert progress_enabled(False) is False  # an explicit argument does not read the variable
    for value, on in (("OFF", False), (" yes ", True), ("0", False), ("", False)):
        monkeypatch.setenv("TC_EXPLORE_PROGRESS", value)
        assert progress_enabled() is on
