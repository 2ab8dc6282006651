# Quickstart targets: `make demo` and `make test` each create .venv when it is
# missing, install everything a fresh Linux machine (Python >= 3.10, no GPU)
# needs, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stagewise-installed

.PHONY: demo test install clean fuzz

install: $(STAMP)

# pillow-simd goes in last, over Pillow's PIL/ folder, with --no-deps so that
# nothing pulls Pillow back. Never `pip uninstall pillow` afterwards: it deletes
# the shared PIL/ folder. A failed build keeps plain Pillow.
$(STAMP): pyproject.toml Makefile pipeline/_jpegraw.c loaders/_cropdecode.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[s3,dali,ray,dev]'
	CC="cc $$(grep -qw avx2 /proc/cpuinfo && echo -mavx2)" \
	  $(BIN)/pip install -q --no-deps --force-reinstall pillow-simd \
	  || echo "pillow-simd did not build; keeping Pillow"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m stagewise.train.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

# Both C decoders under AddressSanitizer + UndefinedBehaviorSanitizer, FUZZ_SECONDS each (tests/fuzz/campaign.py):
# failures are kept in tests/fuzz/regressions/, which `make test` replays. Niced: it takes a core for that long.
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	nice -n 19 $(BIN)/python -m tests.fuzz.campaign --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) demo-data runs

# docker/Dockerfile built with buildah on a Debian base, then pipeline --version, build-shards,
# verify-shards and the CPU demo inside it (docker/check-image.sh, as root): too long for `make test`.
.PHONY: image-check
image-check:
	docker/check-image.sh
