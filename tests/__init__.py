"""clip-tao's test suite. A regular package, so that ``tests.*`` is this folder even where an installed
distribution ships a top-level ``tests`` package of its own (autofaiss does)."""
