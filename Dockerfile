# Our own serving image: the SageMaker inference container contract (`serve`, GET /ping and
# POST /invocations on port 8080, the model in /opt/ml/model) with the project's own server
# (twotower_lit.serving, installed with its `serve` extra), torch, and nothing else.
# AWS's PyTorch inference image also serves the same model.tar.gz (code/inference.py); this image
# is the alternative without TorchServe.
#
#   docker build -t twotower-serve --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> .
#   docker run -p 8080:8080 -v $PWD/outputs/RUN/model:/opt/ml/model:ro twotower-serve serve
#
# Settings: TWOTOWER_<FIELD> environment variables of ServeConfig (e.g. TWOTOWER_WORKERS=2). The
# server binds 127.0.0.1 unless told otherwise; in the container it must answer on every interface
# (SageMaker's contract), hence TWOTOWER_HOST. It runs as an unprivileged user: the model is only
# read, and a --capture-dir must be writable by uid 1000.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 TWOTOWER_HOST=0.0.0.0
WORKDIR /opt/program

# The package with its `serve` extra (torch, numpy, safetensors, the HTTP stack, faiss-cpu for
# TWOTOWER_SEARCH=faiss; no TorchRec, Lightning, MLflow or pandas), held to the pins of
# requirements/base.txt (the tested lock). --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index>
# gives torch's CPU build (a local version, 2.13.0+cpu, which satisfies the pin and outranks the
# default index's CUDA build of the same release: a far smaller image); without it, the CUDA build.
ARG TORCH_INDEX_URL=
COPY requirements/base.txt /tmp/base.txt
COPY pyproject.toml README.md /tmp/src/
COPY twotower_lit/ /tmp/src/twotower_lit/
COPY entrypoints/__init__.py entrypoints/serve.py entrypoints/inference.py /tmp/src/entrypoints/
RUN grep -E '^(torch|numpy|safetensors|starlette|uvicorn|httpx|faiss-cpu)==' /tmp/base.txt > /tmp/serving.txt \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c /tmp/serving.txt "/tmp/src[serve]" \
    && rm -r /tmp/base.txt /tmp/serving.txt /tmp/src

# SageMaker starts the container as `docker run <image> serve`
RUN printf '#!/bin/sh\nexec python -m twotower_lit.serving.server "$@"\n' > /usr/local/bin/serve \
    && chmod +x /usr/local/bin/serve

RUN groupadd --gid 1000 serving && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin serving
USER 1000:1000

EXPOSE 8080
CMD ["serve"]
