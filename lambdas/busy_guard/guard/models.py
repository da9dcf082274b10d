"""The three shapes the guard is invoked with, and the one function that tells them apart.

``classify`` never raises: every input becomes a termination to reconcile, a schedule tick, a
stream batch, something recognised and ignored, or something malformed with a message that says
what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from busy_guard.settings import INSTANCE_ID_PATTERN

TERMINATE_DETAIL_TYPE = "EC2 Instance-terminate Lifecycle Action"
LAUNCH_DETAIL_TYPE = "EC2 Instance-launch Lifecycle Action"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
TEST_NOTIFICATION = "autoscaling:TEST_NOTIFICATION"
SCHEDULED_DETAIL_TYPE = "Scheduled Event"
# Auto Scaling group and hook names: 1-255 characters of printable text, no control characters.
NAME_PATTERN = r"^[^\x00-\x1f\x7f]{1,255}$"


class LifecycleActionDetail(BaseModel):
    """``detail`` of the EventBridge lifecycle-action event, every documented field."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    LifecycleActionToken: str = Field(min_length=1, max_length=128)
    AutoScalingGroupName: str = Field(pattern=NAME_PATTERN)
    LifecycleHookName: str = Field(pattern=NAME_PATTERN)
    EC2InstanceId: str = Field(pattern=INSTANCE_ID_PATTERN)
    LifecycleTransition: str
    NotificationMetadata: str | None = None
    Origin: str | None = None
    Destination: str | None = None


class LifecycleActionEvent(EventBridgeModel):
    detail: LifecycleActionDetail


class ScheduledEvent(EventBridgeModel):
    detail_type: Literal["Scheduled Event"] = Field(alias="detail-type")
    detail: dict[str, Any] = Field(default_factory=dict)


class StreamChange(BaseModel):
    model_config = ConfigDict(extra="ignore")

    Keys: dict[str, Any] = Field(default_factory=dict)
    NewImage: dict[str, Any] | None = None
    OldImage: dict[str, Any] | None = None


class StreamRecord(BaseModel):
    """A DynamoDB stream record; images stay in wire format for ``schema.parse_item``."""

    model_config = ConfigDict(extra="ignore")

    eventID: str = ""
    eventName: str = ""
    eventSourceARN: str = ""
    dynamodb: StreamChange


# --- what an invocation is ------------------------------------------------------------------------
@dataclass(frozen=True)
class Termination:
    event: LifecycleActionEvent

    @property
    def detail(self) -> LifecycleActionDetail:
        return self.event.detail


@dataclass(frozen=True)
class Tick:
    event: ScheduledEvent


@dataclass(frozen=True)
class StreamBatch:
    records: list[Any]


@dataclass(frozen=True)
class Ignored:
    reason: str


@dataclass(frozen=True)
class Malformed:
    reason: str


Invocation = Termination | Tick | StreamBatch | Ignored | Malformed


def classify(event: Any) -> Invocation:
    if not isinstance(event, dict):
        return Malformed(f"event is a {type(event).__name__}, expected a JSON object")
    if "Records" in event:
        records = event["Records"]
        if not isinstance(records, list):
            return Malformed("Records is not a list")
        return StreamBatch(records)
    if event.get("Event") == TEST_NOTIFICATION or _detail(event).get("Event") == TEST_NOTIFICATION:
        return Ignored("autoscaling:TEST_NOTIFICATION")
    source, detail_type = event.get("source"), event.get("detail-type")
    if source == "aws.events" and detail_type == SCHEDULED_DETAIL_TYPE:
        try:
            return Tick(ScheduledEvent.model_validate(event))
        except ValidationError as error:
            return Malformed(f"scheduled event: {explain(error)}")
    if source != "aws.autoscaling":
        return Malformed(f"unrecognised event: source={_short(source)} detail-type={_short(detail_type)}")
    if detail_type == LAUNCH_DETAIL_TYPE:
        return Ignored("launching lifecycle action")
    if detail_type != TERMINATE_DETAIL_TYPE:
        return Ignored(f"auto scaling event {_short(detail_type)}")
    try:
        parsed = LifecycleActionEvent.model_validate(event)
    except ValidationError as error:
        return Malformed(f"lifecycle event: {explain(error)}")
    if parsed.detail.LifecycleTransition != TERMINATING:
        return Ignored(f"transition {_short(parsed.detail.LifecycleTransition)}")
    return Termination(parsed)


def parse_stream_record(raw: Any) -> StreamRecord:
    """Raises ValueError with a readable message for a record that can't be a busy-table change."""
    try:
        return StreamRecord.model_validate(raw)
    except ValidationError as error:
        raise ValueError(f"stream record: {explain(error)}") from None


def explain(error: ValidationError) -> str:
    parts = []
    for problem in error.errors(include_url=False)[:5]:
        where = ".".join(str(part) for part in problem["loc"]) or "event"
        parts.append(f"{where}: {problem['msg']}")
    return "; ".join(parts)


def _detail(event: dict[str, Any]) -> dict[str, Any]:
    detail = event.get("detail")
    return detail if isinstance(detail, dict) else {}


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
