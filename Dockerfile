# The dmoe image: CPU-only torch, the `dmoe` command as entry point, an unprivileged user.
#
#   docker build -t dmoe .          # on python:3.11-slim, from PyPI and PyTorch's CPU index
#   make image-offline              # without any registry: a Debian base image and a wheelhouse (deploy/)
#   docker run --rm dmoe --help
#   docker run --rm --network host dmoe peer --initial-peers /ip4/.../p2p/... --experts 'ffn.[0:4]' --hidden-dim 64
#
# Build arguments: BASE, an image with Python 3.11 (`python3`), and OFFLINE=1 to install only from the wheels in
# deploy/wheelhouse/ (deploy/build-image-offline.sh fills it from deploy/wheelhouse.sh's cache), never an index.
# Every `dmoe` flag is also a DMOE_* variable (`--hidden-dim 64` is `-e DMOE_HIDDEN_DIM=64`). The image listens on
# every interface (DMOE_HOST=0.0.0.0); a peer announces this container's address unless --announce-host is set.
# docker-compose.yml runs a whole swarm from it.

ARG BASE=python:3.11-slim

FROM ${BASE} AS deps
ARG OFFLINE=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_FIND_LINKS=/deploy/wheelhouse PIP_NO_INDEX=${OFFLINE}
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# deploy/wheelhouse/ exists only where deploy/build-image-offline.sh made it (git ignores it)
COPY deploy/ /deploy/
# torch first, from the CPU-only index (the default index would bring multi-GB CUDA libraries); its own layer,
# so that dependency changes do not install it again. 2.13.0+cpu satisfies the package's pin torch==2.13.0.
# Its C++ tests and headers (for compiling extensions, which dmoe never does) stay out of the image.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && rm -rf /opt/venv/lib/python3.11/site-packages/torch/test /opt/venv/lib/python3.11/site-packages/torch/include
WORKDIR /src
COPY pyproject.toml ./
# the dependencies alone (pyproject.toml's list), so that a code change reuses this layer
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    > requirements.txt && pip install -r requirements.txt

FROM deps AS build
COPY README.md ./
COPY proto ./proto
COPY dht ./dht
COPY peer ./peer
COPY router_client ./router_client
COPY models ./models
COPY dmoe_cli ./dmoe_cli
COPY bench ./bench
RUN pip wheel --no-deps --wheel-dir /dist .

FROM ${BASE}
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin dmoe \
    && mkdir -p /data && chown dmoe:dmoe /data
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /dist /dist
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --no-deps --no-index /dist/*.whl && rm -rf /dist && dmoe --help > /dev/null
WORKDIR /app
# A PUBLIC test identity for the compose bootstrap node: anyone can impersonate it. Make your own for real swarms.
COPY --chown=dmoe:dmoe deploy/dht-identity.key ./deploy/
ENV PYTHONUNBUFFERED=1 \
    DMOE_HOST=0.0.0.0
USER dmoe
# 31337: DHT bootstrap node (libp2p, TCP); 31330: a peer's gRPC server; 31331: a peer's own DHT node (libp2p, TCP)
EXPOSE 31330 31331 31337
ENTRYPOINT ["dmoe"]
CMD ["--help"]
