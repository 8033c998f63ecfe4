"""Request and response bodies of the HTTP API, in the seed's camelCase, with input limits."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic.alias_generators import to_camel

from events import StrategyConfig, Tier

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@:\-]{0,63}$"
INSTRUMENT = re.compile(r"^[A-Z0-9]{2,12}([-_/][A-Z0-9]{1,16}){1,2}$")
MAX_PARAMETERS_BYTES = 8192


class CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Credentials(CamelModel):
    """Broker credentials: sealed at once, never logged, never echoed."""

    api_key: SecretStr = Field(min_length=1, max_length=256)
    api_secret: SecretStr = Field(min_length=1, max_length=512)

    def reveal(self) -> dict[str, str]:
        return {
            "apiKey": self.api_key.get_secret_value(),
            "apiSecret": self.api_secret.get_secret_value(),
        }


class StartRequest(CamelModel):
    user_id: str | None = Field(default=None, pattern=ID_PATTERN)
    strategy_id: str = Field(pattern=ID_PATTERN)
    broker_id: str = Field(min_length=1, max_length=50)
    credentials: Credentials
    config: StrategyConfig
    flatten_on_stop: bool = True

    @field_validator("config")
    @classmethod
    def _config_limits(cls, config: StrategyConfig) -> StrategyConfig:
        bad = [i for i in config.instruments if not INSTRUMENT.match(i)]
        if bad:
            raise ValueError(f"instrument {bad[0][:40]!r} is not like BTC-PERPETUAL or ETH-USD")
        if len(json.dumps(config.parameters, default=str)) > MAX_PARAMETERS_BYTES:
            raise ValueError(f"parameters larger than {MAX_PARAMETERS_BYTES} bytes")
        return config


class StopRequest(CamelModel):
    user_id: str | None = Field(default=None, pattern=ID_PATTERN)
    worker_id: str = Field(min_length=1, max_length=100)
    flatten_positions: bool = False


class HaltRequest(CamelModel):
    """The kill switch's scope: a user (admin: any; a user: themselves, the default), or every
    user's runners (`all`, admin only)."""

    user_id: str | None = Field(default=None, pattern=ID_PATTERN)
    everyone: bool = Field(default=False, alias="all")


class UpgradeRequest(CamelModel):
    tier: Tier
    days: float = Field(gt=0, le=3660)


class CreateUserRequest(CamelModel):
    user_id: str = Field(pattern=ID_PATTERN)
    expires_in_days: float | None = Field(
        default=None, gt=0, le=3660, description="the token stops working after this many days "
                                                 "(fractions allowed); never if absent")


class RotateTokenRequest(CamelModel):
    expires_in_days: float | None = Field(
        default=None, gt=0, le=3660, description="the new token stops working after this many "
                                                 "days; never if absent")


def ok(**fields: Any) -> dict[str, Any]:
    return {"success": True, **fields}


def accepts_encoding(accept_encoding: str, coding: str) -> bool:
    """Whether an `Accept-Encoding` header admits `coding` (named, or `*`, with q > 0)."""
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() not in (coding, "*"):
            continue
        q = params.strip().lower()
        try:
            return not q.startswith("q=") or float(q[2:]) > 0
        except ValueError:
            return False
    return False


def failed(error: str, **fields: Any) -> dict[str, Any]:
    return {"success": False, "error": error, **fields}
