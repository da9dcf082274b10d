"""The reusable constructs: the busy table, the guard, its hooks and alarms, the writer policy."""
