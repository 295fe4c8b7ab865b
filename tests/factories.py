"""Small builders shared by unit and integration tests."""

from stream_worker.events import ClickEvent


def click_event(
    user: str, item: str, offset: int, partition: int = 0, event_type: str = "view"
) -> ClickEvent:
    """A decoded event at a partition offset, with an id and time derived from them."""
    return ClickEvent(
        event_id=f"{partition}-{offset}",
        user_id=user,
        item_id=item,
        event_type=event_type,
        ts=1_700_000_000_000 + offset,
        partition=partition,
        offset=offset,
    )
