# make test      the whole suite with real PostgreSQL and Kafka (scripts/test.sh)
# make build     bin/relay
# make relay-load  bin/relay-load, the load tool (its own module, tools/relay-load; Linux)
# make demo      run the relay in demo mode
# make bench     benchmarks
# make cluster-test  the Helm chart on a live Kubernetes under browser-like
#                viewers (scripts/cluster/test.sh; not part of make test): starts
#                a single-node cluster of its own unless KUBECONFIG is set
# make services-up / services-down
#                start/stop the test PostgreSQL and Kafka (services-up also
#                installs Chromium if absent) for running single tests by
#                hand; services-up prints the exports to use, e.g.
#                  eval "$$(make -s services-env)"
#                  go test -run TestX ./pkg/...

SHELL := /usr/bin/env bash
GO ?= go

.PHONY: all test cluster-test build relay-load demo bench services-up services-down services-env

all: build

test:
	bash scripts/test.sh

cluster-test:
	bash scripts/cluster/test.sh

build:
	$(GO) build -o bin/relay ./cmd/relay

# -o is absolute: go -C builds from the tool's own module.
relay-load:
	$(GO) -C tools/relay-load build -o "$(CURDIR)/bin/relay-load" .

demo:
	$(GO) run ./cmd/relay --demo

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./pkg/...

services-up:
	bash scripts/chromium.sh install >/dev/null
	bash scripts/pg.sh start >/dev/null
	bash scripts/kafka.sh start >/dev/null
	@echo
	@echo "# PostgreSQL and Kafka are up. In your shell run:  eval \"\$$(make -s services-env)\""
	@echo "# or paste:"
	@bash scripts/pg.sh env
	@bash scripts/kafka.sh env
	@bash scripts/chromium.sh env
	@echo "# stop them with: make services-down"

services-env:
	@bash scripts/pg.sh env
	@bash scripts/kafka.sh env
	@bash scripts/chromium.sh env

services-down:
	bash scripts/kafka.sh stop
	bash scripts/pg.sh stop
