"""A small CRI client: the calls a kubelet makes to run a pod, over gRPC.

crictl is not packaged in Debian 12, so the tests speak the Container Runtime
Interface themselves, with the messages of layerfs/engines/proto/cri.proto
(written from the published runtime.v1 API)::

    cri = CriClient(containerd_socket)
    pod = cri.run_pod_sandbox(config)
    ctr = cri.create_container(pod, container_config, config)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from layerfs.engines.proto import cri_pb2 as cri


class CriClient:
    RUNTIME = "runtime.v1.RuntimeService"
    IMAGES = "runtime.v1.ImageService"

    def __init__(self, socket: Path, timeout: float = 120) -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket}")
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def call(self, service: str, method: str, request: Message, response: type[Any]) -> Any:
        stub = self.channel.unary_unary(f"/{service}/{method}",
                                        request_serializer=type(request).SerializeToString,
                                        response_deserializer=response.FromString)
        return stub(request, timeout=self.timeout)

    # --- the kubelet's calls ------------------------------------------------------------------
    def version(self) -> cri.VersionResponse:
        return self.call(self.RUNTIME, "Version", cri.VersionRequest(version="v1"),
                         cri.VersionResponse)

    def status(self) -> cri.StatusResponse:
        return self.call(self.RUNTIME, "Status", cri.StatusRequest(), cri.StatusResponse)

    def image_status(self, image: str) -> cri.ImageStatusResponse:
        return self.call(self.IMAGES, "ImageStatus",
                         cri.ImageStatusRequest(image=cri.ImageSpec(image=image)),
                         cri.ImageStatusResponse)

    def run_pod_sandbox(self, config: cri.PodSandboxConfig) -> str:
        resp = self.call(self.RUNTIME, "RunPodSandbox", cri.RunPodSandboxRequest(config=config),
                         cri.RunPodSandboxResponse)
        return str(resp.pod_sandbox_id)

    def pod_sandbox_status(self, pod: str) -> cri.PodSandboxStatus:
        resp = self.call(self.RUNTIME, "PodSandboxStatus",
                         cri.PodSandboxStatusRequest(pod_sandbox_id=pod),
                         cri.PodSandboxStatusResponse)
        return resp.status

    def stop_pod_sandbox(self, pod: str) -> None:
        self.call(self.RUNTIME, "StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod),
                  cri.StopPodSandboxResponse)

    def remove_pod_sandbox(self, pod: str) -> None:
        self.call(self.RUNTIME, "RemovePodSandbox",
                  cri.RemovePodSandboxRequest(pod_sandbox_id=pod), cri.RemovePodSandboxResponse)

    def create_container(self, pod: str, config: cri.ContainerConfig,
                         sandbox_config: cri.PodSandboxConfig) -> str:
        resp = self.call(self.RUNTIME, "CreateContainer",
                         cri.CreateContainerRequest(pod_sandbox_id=pod, config=config,
                                                    sandbox_config=sandbox_config),
                         cri.CreateContainerResponse)
        return str(resp.container_id)

    def start_container(self, container: str) -> None:
        self.call(self.RUNTIME, "StartContainer",
                  cri.StartContainerRequest(container_id=container), cri.StartContainerResponse)

    def container_status(self, container: str) -> cri.ContainerStatus:
        resp = self.call(self.RUNTIME, "ContainerStatus",
                         cri.ContainerStatusRequest(container_id=container),
                         cri.ContainerStatusResponse)
        return resp.status

    def wait_exited(self, container: str, timeout: float = 60) -> cri.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(container)
            if status.state == cri.CONTAINER_EXITED:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {container} still {status.state} after "
                                   f"{timeout:.0f} s")
            time.sleep(0.1)


def pod_config(name: str, log_directory: Path, *, host_network: bool = True
               ) -> cri.PodSandboxConfig:
    """A pod as a kubelet describes it (hostNetwork: true unless told otherwise).

    A host-network pod shares the node's UTS namespace too, so it gets no hostname.
    """
    network = cri.NODE if host_network else cri.POD
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="default"),
        hostname="" if host_network else name, log_directory=str(log_directory),
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
            namespace_options=cri.NamespaceOption(network=network, pid=cri.CONTAINER,
                                                  ipc=cri.POD))))


def log_lines(path: Path) -> list[str]:
    """The text lines of a CRI container log (``TIME STREAM TAG text`` per line)."""
    return [line.split(" ", 3)[3] for line in path.read_text().splitlines() if line.count(" ") >= 3]
