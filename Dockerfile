# The dmoe image: Python 3.11 slim, CPU-only torch, the `dmoe` command as entry point, an unprivileged user.
#
#   docker build -t dmoe .
#   docker run --rm dmoe --help
#   docker run --rm --network host dmoe peer --initial-peers /ip4/.../p2p/... --experts 'ffn.[0:4]' --hidden-dim 64
#
# Every `dmoe` flag is also a DMOE_* variable (`--hidden-dim 64` is `-e DMOE_HIDDEN_DIM=64`). The image listens on
# every interface (DMOE_HOST=0.0.0.0); a peer announces this container's address unless --announce-host is set.
# docker-compose.yml runs a whole swarm from it.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU-only index (the default index would bring multi-GB CUDA libraries); its own layer,
# so that code changes do not download it again. 2.13.0+cpu satisfies the package's pin torch==2.13.0.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY dht ./dht
COPY peer ./peer
COPY router_client ./router_client
COPY models ./models
COPY dmoe_cli ./dmoe_cli
COPY bench ./bench
RUN pip install . && dmoe --help > /dev/null

FROM python:${PYTHON_VERSION}-slim
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin dmoe \
    && mkdir -p /data && chown dmoe:dmoe /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# A PUBLIC test identity for the compose bootstrap node: anyone can impersonate it. Make your own for real swarms.
COPY --chown=dmoe:dmoe deploy ./deploy
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DMOE_HOST=0.0.0.0
USER dmoe
# 31337: DHT bootstrap node (libp2p, TCP); 31330: a peer's gRPC server; 31331: a peer's own DHT node (libp2p, TCP)
EXPOSE 31330 31331 31337
ENTRYPOINT ["dmoe"]
CMD ["--help"]
