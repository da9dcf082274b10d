"""busy-guard's CDK app: configuration, constructs and the stack. The entry point is ``infra/app.py``."""
