# pyquant: the common commands. `make demo` shows the kernels at work; `make test` builds the extension (CUDA module too when nvcc is
# present) and runs the test suite; `make bench` runs the CPU benchmarks.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test demo bench clean

install:
	$(PIP) install -q torch==2.13.0 numpy pytest hypothesis
	$(PIP) install -q -e .

test: install
	$(PYTHON) -c "import pyquant, json; print(json.dumps(pyquant.native_info()))"
	$(PYTHON) -m pytest -q tests

demo: install
	$(PYTHON) -m pyquant.demo

bench: install
	$(PYTHON) -m bench.fake_quant
	$(PYTHON) -m bench.calibration

clean:
	rm -rf build *.egg-info
