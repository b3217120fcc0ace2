# Images of the proxy and the operator, from one build stage:
#
#   docker build --target tiproxy          -t ghcr.io/tidb-tiproxy/tiproxy:0.1.0 .
#   docker build --target tiproxy-operator -t ghcr.io/tidb-tiproxy/tiproxy-operator:0.1.0 .
#
# Both run as the distroless `nonroot` user (65532), which the operator's proxy pods and the
# Helm chart expect (runAsNonRoot, read-only root filesystem).

FROM rust:1.95-bookworm AS build
# protoc: etcd-client generates its gRPC code at build time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tiproxy -p tiproxy-operator \
 && install -D -m 0755 target/release/tiproxy /out/tiproxy \
 && install -D -m 0755 target/release/tiproxy-operator /out/tiproxy-operator

FROM gcr.io/distroless/cc-debian12:nonroot AS tiproxy
COPY --from=build /out/tiproxy /usr/local/bin/tiproxy
USER 65532:65532
EXPOSE 6000 3080
ENTRYPOINT ["/usr/local/bin/tiproxy"]
CMD ["--config", "/etc/tiproxy/proxy.toml"]

FROM gcr.io/distroless/cc-debian12:nonroot AS tiproxy-operator
COPY --from=build /out/tiproxy-operator /usr/local/bin/tiproxy-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tiproxy-operator"]
CMD ["run"]
