"""The test suite (a package so that spawned ranks import ``tests.*`` functions by name)."""
