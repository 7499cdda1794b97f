# Two commands do all the set-up on a fresh Debian machine (as root): `make demo` and `make test`.
.PHONY: setup test lint typecheck unit demo cluster-down protos image

VENV := .venv/bin

setup:
	@bash hack/setup.sh

lint: setup
	$(VENV)/ruff check agent dht registry tests bench hack

typecheck: setup
	$(VENV)/mypy agent dht registry

test: setup lint typecheck
	$(VENV)/python -m pytest -q -p no:cacheprovider

demo: setup
	$(VENV)/python -m hack.demo

cluster-down: setup
	$(VENV)/python -m hack.cluster down

protos: setup
	bash hack/gen-protos.sh

# The agent image as an OCI archive, build/spegla-image.tar, from Debian's packages and PyPI only
# (no container registry): see docs/image.md.
image: setup
	bash hack/build-image.sh
