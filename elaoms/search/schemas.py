"""Request and response bodies of the search tool (POST /webhooks/search-data)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from elaoms.search.service import SearchResult

MAX_LIMIT = 50


class SearchRequest(BaseModel):
    """What the agent's server tool sends. Unknown fields are ignored: the owner may add
    constants to the tool's body schema."""

    model_config = ConfigDict(extra="ignore")

    # Optional here so a missing query is our 400, not FastAPI's generic 422.
    query: str | None = Field(default=None, description="What to look for in earlier calls")
    user_id: str | None = Field(default=None, description="Filled from {{system__caller_id}}")
    caller_id: str | None = Field(default=None, description="Same as user_id")
    limit: int = Field(default=5, ge=1, le=MAX_LIMIT, description="Past calls to quote at most")


class MemoryOut(BaseModel):
    id: str
    content: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    status: str = "success"
    memories_found: int
    context: str
    memories: list[MemoryOut]
    timed_out: bool | None = Field(
        default=None, description="Present and true when the deadline cut the search short"
    )


def search_answer(result: SearchResult) -> dict[str, Any]:
    """The tool's answer for a search result, as `SearchResponse` documents it (the
    endpoint and `elaoms search` share it). Plain data: it is sent as JSON in a seventh of
    the time the model takes to build and serialize it."""
    answer: dict[str, Any] = {
        "status": "success",
        "memories_found": len(result.memories),
        "context": result.context,
        "memories": [
            {"id": memory.id, "content": memory.content, "metadata": memory.metadata}
            for memory in result.memories
        ],
    }
    if result.timed_out:
        answer["timed_out"] = True
    return answer
