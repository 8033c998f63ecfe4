"""`GET /strategies`: each installed strategy and its parameters as a JSON schema, made from the
strategy's own parameter model (so a form, the dashboard's, can be built from it)."""

# no `from __future__ import annotations`: the route's parameter is annotated with the caller
# dependency passed in, which FastAPI could not resolve from a string
import inspect
import logging
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError

from events import RiskManagement
from services.worker.strategies import UnknownStrategy, load_strategy
from services.worker.strategies.base import find_strategy

log = logging.getLogger(__name__)

NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class StrategyDescription(BaseModel):
    description: str
    parameters: dict[str, Any]


class StrategiesAnswer(BaseModel):
    success: bool = True
    strategies: dict[str, StrategyDescription]
    riskManagement: dict[str, Any]


def describe(names: Iterable[str]) -> StrategiesAnswer:
    """The strategies by name, each with its docstring and parameter schema (camelCase keys);
    one that cannot be loaded is left out, with a warning."""
    strategies: dict[str, StrategyDescription] = {}
    for name in sorted(names):
        try:
            cls = load_strategy(name)
        except (UnknownStrategy, ImportError) as exc:
            log.warning("strategy %r cannot be loaded: %s", name, exc)
            continue
        model = getattr(cls, "parameters_model", None)
        schema = (model.model_json_schema(by_alias=True) if isinstance(model, type)
                  and issubclass(model, BaseModel) else NO_PARAMETERS)
        strategies[name] = StrategyDescription(
            description=inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0],
            parameters=schema)
    return StrategiesAnswer(strategies=strategies,
                            riskManagement=RiskManagement.model_json_schema(by_alias=True))


def parameter_problems(name: str, parameters: dict[str, Any]) -> list[str]:
    """What is wrong with `parameters` for strategy `name`, checked against its own parameter
    model as its worker will (a start accepted here can run): one line per problem, naming the
    parameter and never echoing its value."""
    try:
        cls = find_strategy(name)
    except (UnknownStrategy, ImportError) as exc:
        return [f"config.type: strategy {name!r} cannot be loaded here ({exc})"]
    model = getattr(cls, "parameters_model", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    try:
        model.model_validate(parameters)
    except ValidationError as exc:
        return [f"{'.'.join(('config', 'parameters', *map(str, e['loc'])))}: {e['msg']}"
                for e in exc.errors(include_input=False, include_url=False)]
    except Exception as exc:  # a plugin's own validator failing in its own way
        return [f"config.parameters: refused by {name!r}'s parameter model "
                f"({type(exc).__name__})"]
    return []


def add_routes(app: FastAPI, names: Iterable[str], who: Any) -> None:
    """Mount `GET /strategies` (any caller: users choose among them)."""
    answer = describe(names)

    @app.get("/strategies", response_model=StrategiesAnswer)
    async def strategies(_: who) -> StrategiesAnswer:  # type: ignore[valid-type]
        """Each installed strategy's parameters (JSON schema) and the risk limits' schema."""
        return answer
