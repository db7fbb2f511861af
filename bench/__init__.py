"""The lab's benchmarks (see bench/README.md). A package so that the tests can import the
bench code's logic as ``bench.lab....``; the scripts themselves run as files."""
