"""busy-guard: keep EC2 Auto Scaling from terminating an instance in the middle of stateful work."""
