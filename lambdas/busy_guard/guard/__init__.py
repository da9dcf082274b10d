"""The guard Lambda: reconcile terminating instances against the busy table.

``handler`` is the Lambda entry point; ``reconcile`` holds the one code path every trigger uses.
"""
