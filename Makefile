PYTHON ?= python3

.PHONY: install demo test bench

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

# Train the Fashion-MNIST preset on the CPU (about 6 minutes) and write a grid of samples.
demo: install
	$(PYTHON) -m difflab train configs/fashion_mnist.yaml --set train.out_dir=runs/demo --overwrite
	$(PYTHON) -m difflab sample runs/demo --n 64 --out runs/demo --name demo_samples

test: install
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) -m pip install -q diffusers
	$(PYTHON) benchmarks/train_throughput.py
