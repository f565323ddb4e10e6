"""docs/security.md holds each promise to a test: every test it names must
exist, or the promise has silently lost its guard."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_the_security_page_names_exists():
    page = (ROOT / "docs" / "security.md").read_text()
    named = set(re.findall(r"`(?:[\w/]+\.py: ?)?(test_\w+)", page))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))

    assert len(named) > 40
    assert sorted(named - defined) == []
