# One image, both services: `order-service` or `shipping-service` as the command.
# The build needs no database (queries are checked at run time, migrations are embedded).

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# 1. Dependencies only, cached until a manifest or the lock file changes: the
#    workspace's manifests with stub sources, built once.
COPY Cargo.toml Cargo.lock ./
COPY resilience/Cargo.toml resilience/Cargo.toml
COPY service-kit/Cargo.toml service-kit/Cargo.toml
COPY order-service/Cargo.toml order-service/Cargo.toml
COPY shipping-service/Cargo.toml shipping-service/Cargo.toml
COPY demo/Cargo.toml demo/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
RUN set -eu; \
    for c in resilience service-kit order-service shipping-service demo tests; do \
      mkdir -p $c/src $c/benches $c/tests $c/src/bin; \
      echo 'fn main() {}' > $c/src/main.rs; echo '' > $c/src/lib.rs; \
      echo 'fn main() {}' > $c/build.rs; \
    done; \
    echo 'fn main() {}' > tests/src/bin/svc.rs; \
    for b in circuit_breaker idempotency outbox; do echo 'fn main() {}' > resilience/benches/$b.rs; done; \
    cargo build --release --locked -p order-service -p shipping-service || true; \
    rm -rf resilience service-kit order-service shipping-service demo tests \
      target/release/.fingerprint/resilience-* target/release/.fingerprint/service-kit-* \
      target/release/.fingerprint/order-service-* target/release/.fingerprint/shipping-service-* \
      target/release/deps/*resilience* target/release/deps/*service_kit* \
      target/release/deps/*order_service* target/release/deps/*shipping_service*
# 2. The real sources: only the workspace's own crates rebuild.
COPY . .
RUN cargo build --release --locked -p order-service -p shipping-service

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --create-home app
COPY --from=build /src/target/release/order-service /usr/local/bin/order-service
COPY --from=build /src/target/release/shipping-service /usr/local/bin/shipping-service
USER app
WORKDIR /app
ENV BIND_ADDR=0.0.0.0 LOG_FORMAT=json
CMD ["order-service"]
