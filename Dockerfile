# tollgate: multi-stage build. The builder needs cmake (aws-lc, the JWT crypto backend).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tollgate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/tollgate --create-home tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY config/tollgate.example.toml /etc/tollgate/tollgate.toml
USER tollgate
WORKDIR /var/lib/tollgate
EXPOSE 8080 9090
# Secrets come from the environment: TOLLGATE_JWT_SECRET, TOLLGATE_ADMIN_TOKEN (names set in the config).
ENTRYPOINT ["tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
