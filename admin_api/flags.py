"""Live flags over HTTP: list them (viewer), set one and reset one to its initial value
(admin). The flags, their values and their validation are ``billing.live_flags``'s; every
running process has a change within seconds (``runtime.control``; docs/design.md,
"Admin API and live control")."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import ConfigDict, Field

from admin_api.errors import BadRequest
from admin_api.framework import AdminContext, AdminModel, AdminRouter, Role
from admin_api.models import ShortText
from billing import live_flags
from billing.live_flags import DEFINITIONS, FlagState, FlagValueError

router = AdminRouter(tag="flags")

#: What each flag accepts, for the OpenAPI description of a new value.
_ACCEPTED = "; ".join(
    f"`{flag.name}`: {orjson.dumps(flag.kind.json_schema).decode()}" for flag in DEFINITIONS
)


class FlagOut(AdminModel):
    """A live flag: its value in force, the environment's initial value, and where the value
    comes from."""

    name: str = Field(description="As the runbook names it, e.g. `billing.charging_enabled`.")
    value: Any = Field(description="The value in force (JSON; see `valueSchema`).")
    initial_value: Any = Field(description="The environment's value (`env`), or its default.")
    source: Literal["database", "environment"] = Field(
        description="`database`: set over the API (overrides the environment); "
        "`environment`: the initial value."
    )
    updated_at: datetime | None = Field(description="When it was set; null from the environment.")
    updated_by: str | None = Field(description="The admin token's name that set it (or `cli`).")
    env: str = Field(description="The environment variable of its initial value.")
    description: str
    value_schema: dict[str, Any] = Field(description="JSON Schema of the values it accepts.")

    @classmethod
    def of(cls, state: FlagState) -> FlagOut:
        """The JSON form of a flag's state."""
        return cls(
            name=state.name,
            value=state.value,
            initial_value=state.initial_value,
            source="database" if state.source == "database" else "environment",
            updated_at=state.updated_at,
            updated_by=state.updated_by,
            env=state.env,
            description=state.description,
            value_schema=dict(state.json_schema),
        )


class FlagList(AdminModel):
    """Every live flag."""

    data: list[FlagOut]


class FlagPath(AdminModel):
    """The path of a route on one flag."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "billing.charging_rollout_percent"}]}
    )

    name: ShortText = Field(description="The flag's name, e.g. `billing.charging_enabled`.")


class FlagSet(AdminModel):
    """A flag's new value (JSON, of the flag's type)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"value": 25}]})

    value: Any = Field(description="The JSON Schema of the values each flag accepts: " + _ACCEPTED)


def _initial(ctx: AdminContext) -> live_flags.LiveFlags:
    return ctx.settings.initial_flags()


@router.get(
    "/admin/v1/flags",
    role=Role.VIEWER,
    response=FlagList,
    summary="List the live flags with their values, initial values and sources",
)
async def list_flags(ctx: AdminContext) -> FlagList:
    states = await live_flags.flag_states(ctx.pool, _initial(ctx))
    return FlagList(data=[FlagOut.of(state) for state in states])


@router.put(
    "/admin/v1/flags/{name}",
    role=Role.ADMIN,
    params=FlagPath,
    body=FlagSet,
    response=FlagOut,
    summary="Set a live flag (every process has it within 2 s)",
)
async def set_flag(ctx: AdminContext) -> FlagOut:
    body: FlagSet = ctx.body
    async with ctx.pool.acquire() as conn:
        try:
            state = await live_flags.set_flag(
                conn, ctx.actor, ctx.params.name, body.value, _initial(ctx)
            )
        except FlagValueError as exc:
            raise BadRequest(
                f"Invalid value for {exc.name}: it {exc.reason}.",
                param="value",
                code="invalid_flag_value",
                details=[{"field": "value", "message": exc.reason}],
            ) from None
    return FlagOut.of(state)


@router.delete(
    "/admin/v1/flags/{name}",
    role=Role.ADMIN,
    params=FlagPath,
    response=FlagOut,
    summary="Reset a live flag to its initial (environment) value",
)
async def reset_flag(ctx: AdminContext) -> FlagOut:
    async with ctx.pool.acquire() as conn:
        state = await live_flags.reset_flag(conn, ctx.actor, ctx.params.name, _initial(ctx))
    return FlagOut.of(state)
