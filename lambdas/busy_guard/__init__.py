"""busy-guard: keep EC2 Auto Scaling from terminating an instance in the middle of stateful work.

Application code marks its destructive operations; nothing here touches the network at import::

    from busy_guard import instance_busy, OP_KIND_BULK_TABLE_INSERT

    async with instance_busy(instance_id, OP_KIND_BULK_TABLE_INSERT):
        ...
"""

from busy_guard._version import __version__
from busy_guard.writer import (
    OP_KIND_BULK_TABLE_CREATE,
    OP_KIND_BULK_TABLE_INSERT,
    OP_KIND_DAGSTER_MATERIALIZATION,
    OP_KIND_EXTENSIONS_MATERIALIZE,
    OP_KIND_MATERIALIZATION,
    OP_KIND_SEC_STAGING,
    InstanceDrainingError,
    LeaseHandle,
    WriterOptions,
    begin_destructive_op,
    begin_destructive_op_sync,
    end_destructive_op,
    end_destructive_op_sync,
    instance_busy,
    instance_busy_sync,
)

__all__ = [
    "OP_KIND_BULK_TABLE_CREATE",
    "OP_KIND_BULK_TABLE_INSERT",
    "OP_KIND_DAGSTER_MATERIALIZATION",
    "OP_KIND_EXTENSIONS_MATERIALIZE",
    "OP_KIND_MATERIALIZATION",
    "OP_KIND_SEC_STAGING",
    "InstanceDrainingError",
    "LeaseHandle",
    "WriterOptions",
    "__version__",
    "begin_destructive_op",
    "begin_destructive_op_sync",
    "end_destructive_op",
    "end_destructive_op_sync",
    "instance_busy",
    "instance_busy_sync",
]
