# dualhomed: see README.md. Kernel tests need root (they create network namespaces).
GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
STATICCHECK_VERSION := v0.8.2
BIN       := bin

.PHONY: all build test lint bench demo chaos package package-check matrix matrix-timing clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/...

# Every test, race detector on. As root the kernel tests run for real in
# throwaway network namespaces; as a user they skip with a message.
test: build
	$(GO) test -race -count=1 -timeout 20m ./...

lint:
	@fmt=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$fmt" ]; then echo "gofmt needed:"; echo "$$fmt"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...

clean:
	rm -rf $(BIN) dist

# The simulated dual-homed instance, narrated (cmd/dualhomed-demo). Needs root.
demo: build
	$(BIN)/dualhomed-demo

# Side-by-side benchmarks (cmd/dualhomed-bench, which also runs the Go
# micro-benchmarks so that their figures land in the file); writes
# docs/benchmarks.md. Needs root.
bench: build
	$(BIN)/dualhomed-bench -out docs/benchmarks.md

# .deb and .rpm for amd64 and arm64 into dist/ (packaging/build.sh).
package:
	packaging/build.sh

# Linters and install test for the packages (packaging/check.sh). CI runs it.
package-check: package
	packaging/check.sh

# The long fault-injection run (cmd/internal/chaos with CHAOS_LONG=1): more
# iterations of every fault than `make test` does. Needs root.
chaos: build
	CHAOS_LONG=1 $(GO) test -race -count=1 -timeout 30m -v ./cmd/internal/chaos/

# The coexistence matrix (cmd/internal/matrix, docs/coexistence.md): the .deb
# installed into a Debian 12 root booted under systemd-nspawn next to each
# network stack of EC2 images, all configurations at once. Needs root; caches
# the root in /var/cache/dualhomed-matrix (CI builds it afresh). Only the
# amd64 .deb is needed. CI's budget is 30 minutes.
matrix:
	ARCHES=amd64 packaging/build.sh
	MATRIX=1 $(GO) test -count=1 -timeout 30m -parallel 16 -v ./cmd/internal/matrix/

# Hot attach timed for amazon-ec2-net-utils against dualhomed in the matrix's
# container (20 interleaved attaches each, 1 and 51 addresses): a benchmark,
# not run by CI; writes docs/hot-attach-matrix.md, which `make bench` shows in
# docs/benchmarks.md. Needs root.
matrix-timing:
	ARCHES=amd64 packaging/build.sh
	MATRIX=1 MATRIX_TIMING=1 $(GO) test -count=1 -timeout 60m -v -run TestHotAttachTiming ./cmd/internal/matrix/
