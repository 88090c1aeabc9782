# selfix GPU node: ComfyUI (pinned, with the node's custom nodes) + selfix under supervisord, one container per GPU.
#
#   docker build -t selfix:0.1.0 .            # or: docker compose build
#   docker run --gpus '"device=0"' -v /srv/models:/app/models:ro -v selfix-spool:/app/spool ... selfix:0.1.0
#
# Layers go from slow-changing to fast-changing: OS packages, Python, ComfyUI + PyTorch + custom nodes
# (deploy/comfyui.pins), selfix's locked dependencies (deploy/requirements.lock), then selfix's own source last, so a
# code change rebuilds in seconds. Every image, commit and package version is pinned; tests/test_deploy.py checks.

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM nvidia/cuda:12.4.1-base-ubuntu22.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive

# git: ComfyUI and custom nodes at pinned commits; libgl1/libglib2.0-0: OpenCV (controlnet_aux, Impact Pack).
# Versions come from the pinned Ubuntu 22.04 base and its security updates; apt pins would break on every update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# The runtime user. It owns ComfyUI's tree (custom nodes write their config next to their code) and the data dirs;
# selfix's own code stays root-owned.
RUN groupadd --system --gid 10001 selfix \
    && useradd --system --uid 10001 --gid selfix --create-home --home-dir /home/selfix --shell /usr/sbin/nologin selfix \
    && install -d -o selfix -g selfix /opt/comfy /app /app/models /app/loras /app/spool /app/comfylogs /app/temp \
        /app/store /app/comfy

# Python 3.11 (Ubuntu 22.04 ships 3.10; selfix needs 3.11): a pinned standalone build installed by a pinned uv.
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_NO_CACHE=1
RUN uv python install 3.11.18 \
    && "$(uv python find 3.11.18)" -c 'import sys; assert sys.version_info[:3] == (3, 11, 18), sys.version'

# ComfyUI + custom nodes + PyTorch (CUDA 12.4 wheels), as the runtime user. The build fails if a custom node does not
# import (install-comfyui runs main.py --quick-test-for-ci). Bare metal uses the same script and pins.
USER 10001:10001
COPY --chown=10001:10001 deploy/comfyui.pins deploy/comfyui-constraints.txt /opt/comfy/build/deploy/
COPY --chown=10001:10001 scripts/install-comfyui /opt/comfy/build/scripts/
RUN PIP_NO_CACHE_DIR=1 PYTHON="$(uv python find 3.11.18)" \
    /opt/comfy/build/scripts/install-comfyui /opt/comfy/ComfyUI --torch cuda

# selfix's dependencies from the hash-locked file (regenerate with deploy/lock-requirements).
USER 0:0
COPY deploy/requirements.lock /opt/selfix-build/requirements.lock
RUN "$(uv python find 3.11.18)" -m venv /opt/selfix \
    && /opt/selfix/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes \
        -r /opt/selfix-build/requirements.lock

# selfix itself, last. /app/conf/supervisord.conf is the repository's conf/supervisord.conf (the one the tests run).
COPY conf/supervisord.conf /app/conf/supervisord.conf
COPY setup.cfg pyproject.toml README.md /opt/selfix-build/src/
COPY selfix /opt/selfix-build/src/selfix
RUN /opt/selfix/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation \
        /opt/selfix-build/src \
    && rm -rf /opt/selfix-build/src

# SELFIX_HOME defaults to /app (selfix/settings.py): every data directory below is a folder of it.
# Settings that differ from selfix's defaults, plus SPOOL_DIR and COMFY_LOG_DIR, which conf/supervisord.conf reads
# from the environment: `docker exec ... supervisorctl -c /app/conf/supervisord.conf status` works as is.
ENV PATH=/opt/selfix/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    COMFYUI_DIR=/opt/comfy/ComfyUI \
    COMFY_PYTHON=/opt/comfy/ComfyUI/.venv/bin/python \
    SPOOL_DIR=/app/spool \
    COMFY_LOG_DIR=/app/comfylogs

# Base models (mount read-only), the LoRA cache, the spool (the node's only state), ComfyUI's log.
VOLUME ["/app/models", "/app/loras", "/app/spool", "/app/comfylogs"]
WORKDIR /app
USER 10001:10001
EXPOSE 9400

# The watchdog's /healthz on METRICS_PORT (default 9400).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METRICS_PORT', '9400'), timeout=4)"]

# `selfix up` prepares the node and execs supervisord (PID 1): SIGTERM from `docker stop` drains every program.
STOPSIGNAL SIGTERM
ENTRYPOINT ["selfix", "up"]
