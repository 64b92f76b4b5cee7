# MLNode on a GPU host: stock vLLM's CUDA image (Python, torch, vLLM; no fork) plus this project, whose
# vLLM plugin (inference validation, PoC worker extension) vLLM loads through the mlnode entry points.
# Build: make build-release (or docker build -t mlnode .). Run with --gpus all and a volume for state:
#   docker run --gpus all -p 8080:8080 -p 5000:5000 -v mlnode-state:/var/lib/mlnode mlnode
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MLNODE_STATE_DIR=/var/lib/mlnode \
    MLNODE_SUPERVISOR_CONF=/opt/mlnode/supervisord.conf \
    MLNODE_PYTHON=python3 \
    MLNODE_ENGINE=auto

WORKDIR /opt/mlnode
COPY pyproject.toml README.md supervisord.conf ./
COPY node ./node
COPY bus ./bus
COPY contracts ./contracts
COPY services ./services
# torch and vLLM already come with the base image and satisfy the bounds: pip adds only our deps. The
# check proves vLLM sees the plugin (both entry points resolve inside the image's own vLLM) and that the
# plugin's replacements fit this vLLM (its version, and every patched target with its parameters).
RUN python3 -m pip install ".[vllm]" && python3 -c "import node, bus, services.gateway.app" \
    && python3 -c "from importlib.metadata import entry_points as e; \
assert any(p.name == 'mlnode' for p in e(group='vllm.general_plugins')); \
[p.load() for p in e(group='vllm.logits_processors') if p.name.startswith('mlnode')]; \
import services.inference.vllm_plugin.worker; \
from services.inference.vllm_plugin import patches; patches.install()"

EXPOSE 8080 5000
VOLUME ["/var/lib/mlnode"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/livez', timeout=4)" || exit 1
ENTRYPOINT ["mlnode"]
CMD ["up", "--foreground"]
