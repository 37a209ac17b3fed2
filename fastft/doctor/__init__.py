"""``fastft-doctor``: checks fastft on this machine's device (numerics and speed of every kernel, training parity,
memory) and reports what it found; see ``cli.py``. ``references.py`` holds the float64 references of the kernels
that the doctor and the tests share."""
