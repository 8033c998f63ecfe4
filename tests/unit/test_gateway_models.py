"""The gateway's answer shapes."""

from __future__ import annotations

import orjson
import pytest

from services.gateway.models import ok, ok_json


@pytest.mark.parametrize("result", [{}, {"workers": [], "queueStats": {"queuedJobs": 0}}])
def test_ok_json_is_ok_of_the_decoded_result(result: dict) -> None:
    assert orjson.loads(ok_json(orjson.dumps(result))) == ok(**result)


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b""])
def test_ok_json_refuses_anything_but_an_object(raw: bytes) -> None:
    with pytest.raises(ValueError):
        ok_json(raw)
