# One image, both services: `order-service` or `shipping-service` as the command.
# The build needs no database (queries are checked at run time, migrations are embedded).

FROM rust:1-slim-bookworm AS build
WORKDIR /src
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
