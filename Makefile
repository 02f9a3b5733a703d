# egress-cni. Every target that needs system packages depends on `deps`,
# which installs them with apt-get when they are missing (Debian, root).
SHELL      := /bin/bash
GO         ?= go
BIN        := bin
PKGS       := iptables nftables iproute2
TEST_FLAGS ?= -count=1 -timeout 15m
export PATH := $(PATH):/usr/local/go/bin

.PHONY: all build deps test test-unit test-netns demo bench fuzz lint verify clean

all: build

deps:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "deps: installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@$(GO) mod download

build: deps
	@mkdir -p $(BIN)
	$(GO) build -trimpath -o $(BIN)/egress-init ./cmd/init
	$(GO) build -trimpath -o $(BIN)/egress-cni ./cmd/egress-cni
	$(GO) build -trimpath -o $(BIN)/egress-node ./cmd/egress-node
	$(GO) build -trimpath -o $(BIN)/egress-demo ./cmd/egress-demo

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

demo: build
	$(BIN)/egress-demo -egress-init $(BIN)/egress-init

bench: deps
	$(GO) test -run '^$$' -bench . -benchtime 20x -count 1 ./pkg/... ./test/... | tee bench/go-bench.txt

fuzz:
	@for t in $$($(GO) test -list '^Fuzz' ./pkg/rules/ | grep '^Fuzz'); do \
		$(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $${FUZZTIME:-2m} ./pkg/rules/ || exit 1; \
	done

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

verify: lint test

clean:
	rm -rf $(BIN)
