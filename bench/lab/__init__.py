"""The throughput lab behind ``bench/run_lab.py`` (see bench/README.md).

pinning.py      which CPU runs what (the box has 2 cores for three "machines"): split, shared, unpinned
servers.py      lighttpd, iperf3 -s and the blast sink in s, with the generated files
modes.py        what the middlebox p1 is: router, router-srh, pipesd (identity, xor), haproxy
checks.py       proofs that a mode's traffic takes its path intact, before it is measured
workloads.py    iperf3, blast and wrk runs from c, parsed into samples
blast.py        payload-agnostic bulk TCP sender and sink (for byte-changing functions)
interference.py what the rest of the machine did during a sample
cost.py         what a sample cost the middlebox: CPU per request and per GB
report.py       medians, ratios to the router, costs, JSON + markdown
runplan.py      --quick timing and the run's workdir (run_lab.py, run_functions.py, run_paper.py)
perfrun.py      perf record of pipesd's workers under load (bench/perf_profile.sh)
paperfigs.py    the paper's figures as data, their ratios and CSV (bench/run_paper.py)
paperplots.py   their plots
linkemu.py      long and lossy links: netem, or the delayline (bench/linkemu/delayline.c)
probe.py        UDP probes measuring one-way delay, loss and order (emulator calibration)
tcpstats.py     TCP counters and ss per leg during a load run
"""
