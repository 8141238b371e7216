"""What every curation step's config shares: a type tag, a name, and whether it drops or annotates."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from workloads.common.config import StrictModel


class StepConfig(StrictModel):
    name: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Step name used in drop reasons and column names (default: the step's type).",
    )
    mode: Literal["filter", "annotate"] = Field(
        default="filter",
        description="`filter` drops failing documents with a reason; `annotate` keeps them and "
        "writes the reason to a `<name>_flag` column.",
    )

    @property
    def step_name(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]
