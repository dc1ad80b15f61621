# brain-ldm: two commands on a fresh machine -- `make demo` and `make test`.
# Each creates .venv if it is missing (idempotent: a stamp file records the install).

PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# checkov pins boto3/packaging/networkx below ours, so it lives in a venv of its own;
# tests/test_manifests.py runs $(TOOLS)/bin/checkov (and fails without it when CI is set).
TOOLS   := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed
# The compiled pipeline is parsed strictly with the protos of the KFP backend of each supported
# Kubeflow release (manifests/releases.yaml), each in its own venv made from
# kfp-protos-<backend>.txt (the 0.x/1.x protos need protobuf 4, 2.x protobuf 6);
# tests/test_kfp_backend_compat.py runs them (and fails without them when CI is set).
KFP_BACKENDS := 2.4.1 2.5.0 2.15.0
KFP_PROTOS := $(KFP_BACKENDS:%=.venv-kfp-%/.installed)
# mutmut runs pytest in its own process, so its venv reaches .venv's packages through a .pth
# file (behind its own); make mutation (benchmarks/mutation/) uses it.
MUTMUT  := .venv-mutmut
MUTMUT_STAMP := $(MUTMUT)/.installed
MUTMUT_PTH = $(MUTMUT)/lib/python3.11/site-packages/brain-ldm-venv.pth
TORCH   := torch==2.13.0
DEMO_DIR ?= demo-output
# make demo's preset: tiny-cpu trains in minutes (the smoke run); quality-cpu, which
# make demo-quality runs into demo-quality-output, trains for under an hour for samples that
# draw ventricles and lesions (README, "The one-hour quality run").
PRESET  ?= tiny-cpu
NPROC   ?= 1
# make test runs the test files on this many processes (pytest-xdist; a file's tests stay on
# one, so its module fixtures start once). Most tests wait on servers, subprocesses and polls,
# so two processes halve the wall time on two cores; 0 runs them in pytest's own process.
TEST_WORKERS ?= 2

# The venvs are independent: build them side by side (their pip runs are quiet). A recipe
# that needs another's output still waits for it, and demo and test print as they run.
MAKEFLAGS += --jobs=5

.PHONY: help venv tools kfp-protos gpu-wheels demo demo-quality test test-slow mutation lint compile clean

help:
	@echo "make demo       run the whole pipeline locally (kfp.local) and query the served model"
	@echo "                (PRESET=tiny-cpu, about 10 minutes on 2 cores)"
	@echo "make demo-quality  the same with PRESET=quality-cpu into demo-quality-output (under an hour)"
	@echo "make test       fast test suite (CPU, no cluster, < 15 min; TEST_WORKERS=2 processes)"
	@echo "make test-slow  the slow tests (longer training, multi-process runs)"
	@echo "make mutation   named mutations + mutmut scores of the rollout, launcher, gate, smoke check, samplers (slow)"
	@echo "make lint       ruff"
	@echo "make compile    recompile pipelines/brain_ldm.yaml (IMAGE=, STEP_IMAGE= set the default images)"
	@echo "make gpu-wheels wheels the GPU machine lacks, for benchmarks/gpu_check.sh"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, on its own: the CPU build lying on disk here (a plain 'torch' pulls CUDA).
	$(BIN)/python -m pip install --quiet $(TORCH)
	# '.[dev]' is everything: the engine, the pipeline and serve extras, and the test tools.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip check
	@touch $(STAMP)

venv: $(STAMP)

$(TOOLS_STAMP): tools-constraints.txt
	@test -x $(TOOLS)/bin/python || $(PY) -m venv $(TOOLS) || python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS)/bin/python -m pip install --quiet -c tools-constraints.txt checkov==3.3.30
	$(TOOLS)/bin/python -m pip check
	@touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)

# --no-deps: only the generated protobuf modules are used, not the kfp SDK.
.venv-kfp-%/.installed: kfp-protos-%.txt
	@test -x $(@D)/bin/python || $(PY) -m venv $(@D) || python3 -m venv $(@D)
	$(@D)/bin/python -m pip install --quiet --upgrade pip
	$(@D)/bin/python -m pip install --quiet --no-deps -r $<
	@touch $@

kfp-protos: $(KFP_PROTOS)

$(MUTMUT_STAMP): mutmut-constraints.txt $(STAMP)
	@test -x $(MUTMUT)/bin/python || $(PY) -m venv $(MUTMUT) || python3 -m venv $(MUTMUT)
	# pip installs and checks mutmut's own tree first, without .venv's packages in sight.
	rm -f $(MUTMUT_PTH)
	$(MUTMUT)/bin/python -m pip install --quiet --upgrade pip
	$(MUTMUT)/bin/python -m pip install --quiet -c mutmut-constraints.txt mutmut==3.8.1
	$(MUTMUT)/bin/python -m pip check
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > $(MUTMUT_PTH)
	@touch $(MUTMUT_STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipelines.run_local --output $(DEMO_DIR) --preset $(PRESET) --nproc $(NPROC)

demo-quality: $(STAMP)
	$(BIN)/python -m pipelines.run_local --output demo-quality-output --preset quality-cpu --nproc $(NPROC)

test: $(STAMP) $(TOOLS_STAMP) $(KFP_PROTOS)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP) $(TOOLS_STAMP) $(KFP_PROTOS)
	$(BIN)/python -m pytest -q -m slow

# Slow (hours on 2 shared cores; benchmarks/README.md): not part of make test.
mutation: $(STAMP) $(MUTMUT_STAMP)
	$(BIN)/python -m benchmarks.mutation

lint: $(STAMP)
	$(BIN)/ruff check ldm_core components pipelines tests benchmarks
	$(BIN)/ruff format --check ldm_core components pipelines tests benchmarks

# Wheels the GPU machine's image lacks, for benchmarks/gpu_check.sh there (benchmarks/README.md).
gpu-wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
	  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform manylinux1_x86_64 -d .whl \
	  $$(grep -iE '^(monai|nibabel|nilearn|minio|argon2-cffi|argon2-cffi-bindings|cffi|pycparser|pycryptodome)==' constraints.txt)

# IMAGE=registry/brain-ldm-training:tag and STEP_IMAGE=registry/brain-ldm-pipeline:tag make
# those the defaults of the pipeline's image and step_image parameters.
compile: $(STAMP)
	$(BIN)/python -m pipelines.brain_ldm --output pipelines/brain_ldm.yaml \
	  $(if $(IMAGE),--image $(IMAGE)) $(if $(STEP_IMAGE),--step-image $(STEP_IMAGE))

clean:
	rm -rf $(DEMO_DIR) demo-quality-output .pytest_cache
