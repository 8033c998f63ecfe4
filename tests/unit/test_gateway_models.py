"""The gateway's answer shapes."""

from __future__ import annotations

import pytest

from services.gateway.models import accepts_encoding


@pytest.mark.parametrize(("header", "accepted"), [
    ("gzip, deflate", True),
    ("gzip, deflate, br, zstd", True),
    ("Deflate;q=0.5", True),
    ("*", True),
    ("deflate;q=0", False),
    ("gzip", False),
    ("identity", False),
    ("", False),
    ("deflate;q=x", False),
])
def test_accepts_encoding(header: str, accepted: bool) -> None:
    assert accepts_encoding(header, "deflate") is accepted
