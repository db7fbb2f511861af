"""SRv6Pipes: transparent, SR-aware TCP proxy running bytestream functions.

The data path, one module per step:
  capture.py   SYN capture (NFQUEUE process) -> SRH table (cext/srhtable.pyx)
  worker.py    accept -> SRH lookup -> function lookup (functions.py) -> connect onward
  cext/relay   relay both directions (identity: recv/send, splice once bulk; buffers for functions) -> close
Around it: addressplan.py and srh.py (pure codecs), kernelsetup.py (rules, routes,
nftables), master.py (pre-fork supervisor), control.py (control socket), cli.py.
"""
__version__ = "0.1.0"
