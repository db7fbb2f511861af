# Two commands for a fresh Debian machine, as root:
#   make demo   builds a testbed (C -> P1 -> P2 -> S), runs pipesd on P1 and P2, sends real
#               traffic with curl to lighttpd, prints what happened, tears everything down
#   make test   runs the whole test suite
#   make lint   ruff over the tree, mypy over the pure-Python modules (pyproject.toml)
#   make package  builds the sdist, a wheel from it, and checks both (.ci/check-package)
# Both install what they need first (system packages, Python packages, the Cython build).
PYTHON ?= python3
APT_PACKAGES = build-essential iproute2 nftables iptables kmod procps psmisc \
	libnetfilter-queue-dev libnfnetlink-dev libcap-dev zlib1g-dev \
	clang libbpf-dev linux-libc-dev \
	curl lighttpd wrk iperf3 haproxy dnsutils
STAMP = .deps-installed

.PHONY: deps build demo test lint package docs bench figures clean

$(STAMP): Makefile requirements.txt
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES)
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $(STAMP)

deps: $(STAMP)

build: deps
	$(PYTHON) -m pip install -q --no-build-isolation -e .

demo: build
	$(PYTHON) -m srv6pipes.lab.demo

test: build
	$(PYTHON) -m pytest tests

lint: deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

package: deps
	PYTHON=$(PYTHON) .ci/check-package

# docs/cli.md comes from the settings' declarations (a test fails when it is stale).
docs: build
	$(PYTHON) -m srv6pipes.clidoc > docs/cli.md

bench: build
	$(PYTHON) bench/run_lab.py

# The paper's Fig. 6, 7, 8, 9, 11 (about 40 minutes): PNGs into docs/, raw data into
# bench/paper-data/. One figure: $(PYTHON) bench/run_paper.py --figure 7
figures: build
	$(PYTHON) bench/run_paper.py

clean:
	rm -rf build dist *.egg-info cext/*.c pipes/*.so pipes/modules/*.so bench/linkemu/build $(STAMP)
