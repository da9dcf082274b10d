"""busy-guard's benchmarks: ``make bench`` (``python -m tests.bench``) runs them all and prints the figures.

One module per question of issue 6: ``latency`` (release latency on the sandbox's clock), ``calls``
(AWS calls per decision and per tick), ``throughput`` (one tick with 1,000 waiting instances),
``cold_start`` (import time against boto3's) and ``writer`` (begin/end cost and worst cases). None of
them is a test: pytest does not collect this package, and nothing here asserts a wall-clock limit.
The figures and the machine they came from are recorded in ``docs/performance.md``.
"""
