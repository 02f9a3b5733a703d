# egress-cni. Every target that needs system packages depends on `deps`,
# which installs them with apt-get when they are missing (Debian, root).
SHELL      := /bin/bash
GO         ?= go
BIN        := bin
PKGS       := iptables nftables iproute2
TEST_FLAGS ?= -count=1 -timeout 15m
export PATH := $(PATH):/usr/local/go/bin

.PHONY: all build deps test test-unit test-netns demo bench fuzz lint verify clean image

all: build

deps:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "deps: installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@$(GO) mod download

# containerd and runc from Debian, for the real-runtime test (test/runtime).
# policy-rc.d keeps the package from starting a containerd service in the
# machine's own namespace; the test starts its own in a namespace of ours.
.PHONY: deps-runtime
RUNTIME_PKGS := containerd runc
deps-runtime:
	@missing=""; for p in $(RUNTIME_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "deps-runtime: installing$$missing"; \
		guard=""; if [ ! -e /usr/sbin/policy-rc.d ]; then guard=/usr/sbin/policy-rc.d; \
			printf '#!/bin/sh\nexit 101\n' > $$guard && chmod 0755 $$guard; trap 'rm -f $$guard' EXIT; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
test: deps-runtime

build: deps
	@mkdir -p $(BIN)
	$(GO) build -trimpath -o $(BIN)/egress-init ./cmd/init
	$(GO) build -trimpath -o $(BIN)/egress-cni ./cmd/egress-cni
	$(GO) build -trimpath -o $(BIN)/egress-node ./cmd/egress-node
	$(GO) build -trimpath -o $(BIN)/egress-cni-install ./cmd/egress-cni-install
	$(GO) build -trimpath -o $(BIN)/egress-demo ./cmd/egress-demo

# The DaemonSet image, without a container daemon (install/image): the
# static binaries (CGO_ENABLED=0, -trimpath) in one layer, written as an
# OCI layout ($(BIN)/image/oci), its tar for `ctr images import` or
# `skopeo copy oci-archive:` ($(BIN)/image/egress-cni-image.tar) and a
# docker-archive for `docker load`. Reproducible: the same sources give
# the same digest ($(BIN)/image/egress-cni-image.digest). IMAGE sets the
# reference (default: the one the manifests name).
IMAGE ?=
image: deps
	$(GO) run ./install/image/build -out $(BIN)/image $(if $(IMAGE),-ref $(IMAGE))

# The whole suite: pure tests and the privileged tests in network
# namespaces of our own. As root the privileged tests run; set
# EGRESS_CNI_REQUIRE_PRIVILEGED=1 (CI does) to turn their skip into a
# failure when not root.
test: deps lint
	$(GO) test $(TEST_FLAGS) ./...

test-unit:
	$(GO) test $(TEST_FLAGS) -short ./pkg/... ./internal/... ./cmd/...

test-netns: deps
	$(GO) test $(TEST_FLAGS) -v ./test/netns/...

# A simulated cluster in network namespaces of its own: the real installer
# on each node, pods through the real CNI chain, traffic along every path
# out, and a table (cmd/egress-demo). The CNI reference plugins it needs are
# built once into $(BIN)/cni-plugins. `$(BIN)/egress-demo -capture-backends`
# shows the pod layer alone, per backend.
demo: build
	$(BIN)/egress-demo

# The benchmark suite (root; network namespaces of its own only): pure Go
# benchmarks at N=10,000, then cmd/egress-bench, which times egress-init,
# the plugin, the data plane and the node layer against floors taken in the
# same run and writes bench/results.md and bench/apply.svg. GNU time reads
# the peak RSS.
bench: deps
	@dpkg -s time >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends time; }
	@mkdir -p $(BIN) bench
	$(GO) build -trimpath -o $(BIN)/egress-init ./cmd/init
	$(GO) build -trimpath -o $(BIN)/egress-cni ./cmd/egress-cni
	$(GO) build -trimpath -o $(BIN)/nftfloor ./bench/floor/nftfloor
	$(GO) build -trimpath -o $(BIN)/egress-bench ./cmd/egress-bench
	$(GO) test -run '^$$' -bench '10k$$|^BenchmarkBuildRenderNFT$$' -benchmem -benchtime 20x -count 1 ./pkg/rules/ | tee bench/go-bench.txt
	$(BIN)/egress-bench -bin $(BIN) -out bench -gobench bench/go-bench.txt

# Every fuzz target of every package, FUZZTIME each (default 2m). Their
# seed corpora (f.Add and testdata/fuzz) also run in `make test`.
fuzz:
	@for pkg in ./pkg/rules ./pkg/cni ./pkg/node ./pkg/install ./pkg/audit; do \
		targets=$$($(GO) test -list '^Fuzz' $$pkg) || { echo "$$targets"; exit 1; }; \
		for t in $$(echo "$$targets" | grep '^Fuzz'); do \
			echo "== $$pkg $$t"; \
			$(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $${FUZZTIME:-2m} $$pkg || exit 1; \
		done; \
	done

# gofmt, go vet (the portable packages also for darwin and windows), then
# golangci-lint with .golangci.yml. golangci-lint is
# built from the version pinned in tools/golangci-lint (a module of its
# own, so its dependencies stay out of ours) into $(BIN) once, and again
# only when that pin changes.
GOLANGCI_LINT := $(BIN)/golangci-lint
$(GOLANGCI_LINT): tools/golangci-lint/go.mod tools/golangci-lint/go.sum
	@mkdir -p $(BIN)
	GOWORK=off $(GO) build -C tools/golangci-lint -trimpath -buildvcs=false -o $(CURDIR)/$(GOLANGCI_LINT) github.com/golangci/golangci-lint/v2/cmd/golangci-lint

PORTABLE_PKGS := ./pkg/rules ./pkg/node ./pkg/cni
lint: $(GOLANGCI_LINT)
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@# The platform split (pkg/rules doc): the pure packages, tests
	@# included, must build off Linux.
	GOOS=darwin $(GO) vet $(PORTABLE_PKGS)
	GOOS=windows $(GO) vet $(PORTABLE_PKGS)
	$(GOLANGCI_LINT) run ./...

verify: lint test

clean:
	rm -rf $(BIN)
