"""
The Elastic IP of the rig: moto in a host of its own, reachable from every host, and an address
that follows moto's association into the holder's namespace, so a client outside reaches the
holder's service through that one address.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from puppetha.testing.eip import ElasticIPEmulator
from puppetha.testing.moto import Fleet
from puppetha.testing.netns import Host, Rig
from puppetha.testing.partition import cut, heal
from puppetha.testing.rig_aws import MotoInRig

SERVICE_PORT = 8140


class NameServer:
    """Answers every connection to any address of its host, on one port, with the host's name."""

    def __init__(self, host: Host) -> None:
        self.listener = host.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("0.0.0.0", SERVICE_PORT))  # noqa: S104 - inside the host: also the EIP
        self.listener.listen(50)
        self.name = host.name.encode()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                connection.sendall(self.name)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def who_answers(address: str) -> str | None:
    """The name the service at ``address`` gives a client outside, or None when nothing answers."""
    try:
        with socket.create_connection((address, SERVICE_PORT), timeout=2) as connection:
            return connection.recv(100).decode()
    except OSError:
        return None


@attrs.frozen
class EipRig:
    rig: Rig
    eip: ElasticIPEmulator
    ec2: object
    allocation_id: str
    instances: dict[str, str]  # host name -> instance id

    def associate(self, host: str, **extra: object) -> None:
        self.ec2.associate_address(  # type: ignore[attr-defined]
            AllocationId=self.allocation_id, InstanceId=self.instances[host], **extra
        )


@pytest.fixture
def eip_rig(tmp_path: Path) -> Iterator[EipRig]:
    with Rig(["lb1", "lb2", "aws"]) as rig:
        sock = tmp_path / "associations.sock"
        servers = [NameServer(rig[name]) for name in ("lb1", "lb2")]
        with MotoInRig(rig["aws"], associations_socket=sock, log_dir=tmp_path) as moto:
            fleet = Fleet(moto.endpoint_url)
            instances = {name: fleet.launch("lb").instance_id for name in ("lb1", "lb2")}
            allocation_id = fleet.allocate_address()
            mapping = {instance: rig[name] for name, instance in instances.items()}
            with ElasticIPEmulator(rig, allocation_id, rig.spare_address(), sock, mapping) as eip:
                yield EipRig(rig, eip, fleet.ec2, allocation_id, instances)
        for server in servers:
            server.close()
    assert rig.leftovers() == []


def test_moto_in_its_own_host_answers_every_host(tmp_path: Path) -> None:
    with Rig(["lb1", "aws"]) as rig, MotoInRig(rig["aws"], log_dir=tmp_path) as moto:
        url = f"{moto.endpoint_url}/moto-api/data.json"
        answer = rig["lb1"].run(
            ["python3", "-c", f"import urllib.request; print(urllib.request.urlopen('{url}').status)"]
        )
        assert answer.stdout.strip() == "200"
        cut(rig["lb1"], rig["aws"])
        refused = rig["lb1"].run(
            [
                "python3",
                "-c",
                f"import urllib.request; urllib.request.urlopen('{moto.endpoint_url}', timeout=1)",
            ],
            check=False,
        )
        assert "timed out" in refused.stderr
        heal(rig["lb1"])


def test_the_address_follows_the_association_and_a_client_outside_follows_it(eip_rig: EipRig) -> None:
    rig, eip = eip_rig.rig, eip_rig.eip
    assert who_answers(eip.address) is None
    eip_rig.associate("lb1")
    first = eip.wait_for(rig["lb1"])
    assert who_answers(eip.address) == "lb1"
    assert eip.address in rig["lb1"].addresses()

    eip_rig.associate("lb2", AllowReassociation=True)
    second = eip.wait_for(rig["lb2"])
    assert who_answers(eip.address) == "lb2"
    assert eip.address not in rig["lb1"].addresses()
    assert eip.address in rig["lb2"].addresses()

    assert [(m.host, m.instance_id) for m in eip.history] == [
        ("lb1", eip_rig.instances["lb1"]),
        ("lb2", eip_rig.instances["lb2"]),
    ]
    assert first.sequence < second.sequence
    assert all(m.associated_at <= m.placed_at for m in eip.history)


def test_a_refused_association_moves_nothing(eip_rig: EipRig) -> None:
    rig, eip = eip_rig.rig, eip_rig.eip
    eip_rig.associate("lb1")
    eip.wait_for(rig["lb1"])
    with pytest.raises(Exception, match="AlreadyAssociated"):
        eip_rig.associate("lb2", AllowReassociation=False)
    # A later real move is the very next one: the refusal announced nothing.
    eip_rig.associate("lb2", AllowReassociation=True)
    eip.wait_for(rig["lb2"])
    assert [m.host for m in eip.history] == ["lb1", "lb2"]


def test_disassociated_the_address_is_nowhere(eip_rig: EipRig) -> None:
    rig, eip = eip_rig.rig, eip_rig.eip
    eip_rig.associate("lb1")
    eip.wait_for(rig["lb1"])
    eip_rig.ec2.disassociate_address(  # type: ignore[attr-defined]
        AssociationId=eip_rig.ec2.describe_addresses(AllocationIds=[eip_rig.allocation_id])[  # type: ignore[attr-defined]
            "Addresses"
        ][0]["AssociationId"]
    )
    move = eip.wait_for(None)
    assert move.instance_id == ""
    assert all(eip.address not in rig[name].addresses() for name in ("lb1", "lb2"))


def test_an_instance_of_no_host_takes_the_address_out_of_the_rig(eip_rig: EipRig, tmp_path: Path) -> None:
    rig, eip = eip_rig.rig, eip_rig.eip
    eip_rig.associate("lb1")
    eip.wait_for(rig["lb1"])
    stranger = eip_rig.ec2.run_instances(  # type: ignore[attr-defined]
        ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1
    )["Instances"][0]["InstanceId"]
    eip_rig.ec2.associate_address(  # type: ignore[attr-defined]
        AllocationId=eip_rig.allocation_id, InstanceId=stranger, AllowReassociation=True
    )
    assert eip.wait_for(None).instance_id == stranger
    assert who_answers(eip.address) is None
