"""Development tools, not part of the installed package: benchmarks, soak and load tests, training and
evaluation of the demo weights. Run them through the Makefile (`make bench|soak|load|train|evaluate`)."""
