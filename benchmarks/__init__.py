"""Side-by-side speed and memory comparisons of the probes against their baselines: each script
runs as ``python benchmarks/<script>.py`` (``--help`` lists its options); ``_harness.py`` holds
what they share."""
