"""Quantisation (issue 18): LSQ fake quantisation (``fake.py``), fake-quantised Linear / Conv2d layers with
timestep-aware activation step sizes (``modules.py``) and quantisation-aware training as a model change
(``qat.py``, ``adapt: [{kind: qat}]``); torchao's numerics as qat schemes (``torchao_scheme.py``) and their
quantise-on-load export (``torchao_export.py``)."""
