"""progress.tqdm: plain text where nobody watches a live bar, nested bars silent there, and a bar
that ends early still shows 100 % (unless an exception stopped it)."""
import io

import pytest

from defectlab.base import progress


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.setenv(progress.PLAIN, "1")


def test_plain_mode_is_tqdm_std_and_nested_bars_are_silent(plain):
    assert not progress.interactive()
    out = io.StringIO()
    bar = progress.tqdm(range(3), file=out, desc="outer")
    assert type(bar) is progress.PlainBar and bar.mininterval == progress.MININTERVAL
    list(bar)
    assert out.getvalue().rstrip().rsplit("\r", 1)[-1].startswith("outer: 100%|")
    inner = io.StringIO()
    list(progress.tqdm(range(3), file=inner, leave=False))
    assert inner.getvalue() == ""


def test_an_early_stop_ends_at_100_percent_an_exception_does_not(plain):
    out = io.StringIO()
    bar = progress.tqdm(total=10, file=out)
    bar.update(4)
    bar.close()  # patience stopped the loop: the work done is what the bar counts
    assert bar.total == 4 and "100%|" in out.getvalue().rsplit("\r", 1)[-1]
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress.tqdm(total=10, file=out) as bar:
            bar.update(4)
            raise RuntimeError
    assert bar.total == 10 and "100%" not in out.getvalue()


def test_interactive_where_someone_watches(monkeypatch):
    monkeypatch.delenv(progress.PLAIN, raising=False)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.interactive()
    assert isinstance(progress.tqdm(total=1, disable=True), progress.LiveBar)


def test_plain_bars_do_not_redraw_for_each_postfix(plain):
    out = io.StringIO()
    bar = progress.tqdm(total=50, file=out, desc="train")
    for i in range(50):
        bar.set_postfix(loss=f"{i:.4f}")
        bar.update(1)
    bar.close()
    assert out.getvalue().count("\r") <= 3  # the first line, the 100 % line (and its final refresh)
