# cpp job service on a CUDA runtime. Build: docker build -t cpp-service .
# Run (GPU, data and model cache mounted; see docs/service.md):
#   docker run --gpus all -p 8000:8000 -v "$PWD/cpp-data:/data" -v "$PWD/models:/models" \
#     -v /srv/photos:/photos:ro -e CPP_ALLOWED_ROOTS=/photos -e CPP_API_KEYS=change-me cpp-service
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY . /app
# PyPI's Linux torch wheels bundle the CUDA 12 libraries; the gpu extra adds faiss-gpu, service the web stack.
RUN pip install ".[service,gpu,postgres]"

RUN useradd --create-home --uid 10001 cpp \
    && mkdir -p /data /models \
    && chown cpp:cpp /data /models
USER cpp

# /data: job database and artifacts. /models: Hugging Face / open_clip / torch caches (mount to keep
# downloaded weights between containers).
ENV CPP_DATA_DIR=/data \
    HF_HOME=/models/huggingface \
    TORCH_HOME=/models/torch \
    XDG_CACHE_HOME=/models/cache
VOLUME ["/data", "/models"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1

CMD ["cpp", "serve", "--host", "0.0.0.0", "--port", "8000"]
