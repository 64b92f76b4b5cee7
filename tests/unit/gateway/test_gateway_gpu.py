"""GPU facts over HTTP: the contract's shapes, honest without NVML (empty list, 503), real with it."""

from __future__ import annotations

from collections.abc import Iterator

import falcon.testing
import jsonschema
import msgspec
import pytest

from contracts.node import GpuDevices, GpuDriver
from node import config, gpu
from node.identity import ensure_node_keys
from services.gateway.app import PortRouter


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[falcon.testing.TestClient]:
    settings = config.load({"MLNODE_STATE_DIR": str(tmp_path_factory.mktemp("gpu"))})
    ensure_node_keys(settings.keys_dir)  # what `mlnode up` does before the gateway starts
    router = PortRouter(settings)
    yield falcon.testing.TestClient(router.api)
    router.services.close()


def nvml_present() -> bool:
    return gpu._load() is not None


def test_devices_have_the_contract_shape(client: falcon.testing.TestClient) -> None:
    resp = client.simulate_get("/api/v1/gpu/devices")
    assert resp.status_code == 200
    jsonschema.validate(resp.json, msgspec.json.schema(GpuDevices))
    assert resp.json["count"] == len(resp.json["devices"])
    if not nvml_present():
        assert resp.json == {"devices": [], "count": 0}
    else:
        assert [d["index"] for d in resp.json["devices"]] == list(range(resp.json["count"]))
        for device in resp.json["devices"]:
            assert device["free_memory_mb"] + device["used_memory_mb"] <= device["total_memory_mb"] + 1


def test_driver_is_a_503_without_nvml_else_the_versions(client: falcon.testing.TestClient) -> None:
    resp = client.simulate_get("/api/v1/gpu/driver")
    if not nvml_present():
        assert resp.status_code == 503
        assert resp.json["detail"].startswith("NVML unavailable")
        assert "\n" not in resp.json["detail"]
    else:
        assert resp.status_code == 200
        jsonschema.validate(resp.json, msgspec.json.schema(GpuDriver))
        major, minor = resp.json["cuda_driver_version"].split(".")
        assert int(major) >= 10 and minor.isdigit()


def test_summary_for_health_agrees_with_the_device_list(client: falcon.testing.TestClient) -> None:
    summary = gpu.summary()
    devices = client.simulate_get("/api/v1/gpu/devices").json
    assert summary["count"] == devices["count"] and summary["available"] == bool(devices["devices"])
    if not nvml_present():
        assert summary["error"].startswith("NVML unavailable")
