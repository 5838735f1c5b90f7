"""fastconv's benchmark suite (a program, not tests): ``python benchmarks/run.py --help``.

``run.py`` loads this folder as the package ``fastconv_benchmarks`` when it is run as a script
or loaded by path, so the helper modules import each other relatively:

- ``cases.py``: the cases, their data, FLOP counts and fastconv's runners;
- ``peers.py``: the baselines (PyTorch CPU, ONNX Runtime, plain NumPy), each optional;
- ``machine.py``: machine description, BLAS roofline, memory probes;
- ``timing.py``: interleaved timing of several libraries on one case;
- ``report.py``: the printed table, JSON and PNG.
"""
