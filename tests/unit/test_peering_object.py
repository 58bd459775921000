"""The operator creates its ClusterKopfPeering at start when it is missing, and only then."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from m2m_token_operator.api.constants import JsonObject
from m2m_token_operator.kube.kube_api import KubeError, NotFound
from m2m_token_operator.kube.peering import ensure_cluster_peering


@dataclass
class Peering:
    name: str = "m2m-token-operator"
    mandatory: bool = True
    clusterwide: bool = True
    standalone: bool = False


@dataclass
class PeeringObjects:
    """ClusterKopfPeerings as the API server holds them; `served` False answers 404."""

    existing: set[str] = field(default_factory=set)
    served: bool = True
    served_after_reads: int = 0
    reads: int = 0
    creates: list[str] = field(default_factory=list)

    async def read_cluster_peering(self, name: str) -> JsonObject | None:
        self.reads += 1
        if not self.served and self.reads <= self.served_after_reads:
            raise NotFound(action="read ClusterKopfPeering", status=404, reason="Not Found")
        return {"metadata": {"name": name}} if name in self.existing else None

    async def create_cluster_peering(self, name: str) -> bool:
        self.creates.append(name)
        if name in self.existing:
            return False
        self.existing.add(name)
        return True


async def test_a_missing_peering_object_is_created() -> None:
    objects = PeeringObjects()
    await ensure_cluster_peering(Peering(), objects)
    assert objects.creates == ["m2m-token-operator"]
    assert objects.existing == {"m2m-token-operator"}


async def test_an_existing_peering_object_is_only_read() -> None:
    objects = PeeringObjects(existing={"m2m-token-operator"})
    await ensure_cluster_peering(Peering(), objects)
    assert objects.reads == 1
    assert objects.creates == []


@pytest.mark.parametrize(
    "peering",
    [
        Peering(standalone=True),
        Peering(clusterwide=False),
        Peering(mandatory=False, name="default"),
    ],
    ids=["standalone", "namespaced", "no --peering"],
)
async def test_nothing_is_created_unless_kopf_waits_for_a_named_cluster_peering(
    peering: Peering,
) -> None:
    objects = PeeringObjects()
    await ensure_cluster_peering(peering, objects)
    assert (objects.reads, objects.creates) == (0, [])


async def test_a_crd_not_served_yet_is_waited_for() -> None:
    objects = PeeringObjects(served=False, served_after_reads=2)
    await ensure_cluster_peering(Peering(), objects, retry_interval=0)
    assert objects.reads == 3
    assert objects.creates == ["m2m-token-operator"]


async def test_a_crd_never_served_fails_the_start_after_the_attempts() -> None:
    objects = PeeringObjects(served=False, served_after_reads=10)
    with pytest.raises(KubeError):
        await ensure_cluster_peering(Peering(), objects, attempts=3, retry_interval=0)
    assert objects.reads == 3
