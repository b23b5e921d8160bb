# tollgate: multi-stage build.
#
#   docker build -t tollgate --build-arg TOLLGATE_GIT_COMMIT=$(git rev-parse --short=12 HEAD) .
#   docker run --rm -p 8080:8080 -p 9090:9090 -v tollgate-data:/data \
#     -e TOLLGATE_ADMIN_TOKEN -e TOLLGATE_JWT_SECRET tollgate
#
# .git is not sent to the build (.dockerignore), so `tollgate --version` names the commit given
# as TOLLGATE_GIT_COMMIT, or `unknown` without it. deploy/compose.yaml runs it with Redis,
# Postgres and a demo upstream.

FROM rust:1.95-bookworm AS build
# cmake: aws-lc (the crypto backend of rustls and the JWT checks) is built with it.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml, Cargo.lock or
# build.rs change, not on every source edit. Cargo needs every target the manifest declares to
# exist, so the binary, the library and each [[bench]] are stubs here (benches are not built).
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for bench in load token_cache journal peers customers accuracy; do echo 'fn main() {}' > "benches/$bench.rs"; done \
    && cargo build --release --locked --bin tollgate \
    && rm -rf src

# Then the sources: what the crate compiles or embeds (SQL migrations, the example config the
# demo runs). COPY keeps the files' own times, which can be older than the stubs' build, so the
# crate roots are touched for cargo to see them as changed.
COPY src src
COPY migrations migrations
COPY config config
# Declared here, not above: a new commit must not invalidate the dependency layer.
ARG TOLLGATE_GIT_COMMIT
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin tollgate \
    && ./target/release/tollgate --version

FROM debian:bookworm-slim
# ca-certificates: HTTPS upstreams, JWKS and Stripe; curl: the HEALTHCHECK.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home tollgate \
    && mkdir -p /data /etc/tollgate \
    && chown tollgate:tollgate /data
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
# The default config: proxy on 0.0.0.0:8080, admin on 0.0.0.0:9090, SQLite ledger and spool
# under /data, upstream `upstream:8000`. Mount your own over it.
COPY deploy/tollgate.docker.toml /etc/tollgate/tollgate.toml
ARG TOLLGATE_GIT_COMMIT
LABEL org.opencontainers.image.title="tollgate" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${TOLLGATE_GIT_COMMIT}"
# Numeric, so a runtime that insists on a non-root user (runAsNonRoot) can check it.
USER 10001:10001
WORKDIR /data
# The SQLite ledger, the usage spool and the reservation journal.
VOLUME /data
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9090/healthz || exit 1
# Secrets come from the environment, under the names the config gives: TOLLGATE_ADMIN_TOKEN,
# TOLLGATE_JWT_SECRET (at least 32 bytes), TOLLGATE_METRICS_TOKEN (optional).
# SIGTERM drains for up to proxy.drain_delay + proxy.shutdown_grace (15 s by default): stop with
# `docker stop -t 20` so the last usage reaches the ledger before a SIGKILL.
ENTRYPOINT ["tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
