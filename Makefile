# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   install, then run the whole job on generated videos and a tiny VAE
#   make test   install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Installed before the package so that pip never resolves a bare `torch` to a multi-GB CUDA
# build on a CPU machine. On a GPU machine, pass the build you want, e.g. TORCH='torch==2.13.0'
# from the CUDA index that matches your driver (see the README).
TORCH  ?= torch==2.13.0

.PHONY: demo test bench gpu-bundle install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m pipeline demo --workdir demo-output

# The autoscaler test stops every Ray on the machine, so it runs after the rest, on its own.
test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not autoscaler" --durations=15
	$(BIN)/python -m pytest -q -p no:cacheprovider -m autoscaler

# Benchmarks (never part of the tests); the decode comparison needs Debian's ffmpeg.
bench: install
	$(BIN)/python -m bench --device cpu --quick

# The wheels the offline GPU benchmark carries (Python 3.12, the GPU image's); on the GPU machine:
#   bash bench/gpu_run.sh .gpu-bundle OUTDIR
gpu-bundle: install
	$(BIN)/python -m bench.bundle --python-version 3.12 --out .gpu-bundle

clean:
	rm -rf $(VENV) demo-output
