"""The base class of every config section: unknown keys rejected, values frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: typos fail loudly instead of being ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
